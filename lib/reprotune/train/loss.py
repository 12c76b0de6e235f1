"""Cross-entropy from hidden states at supervised positions only, a chunk of rows at a time.

Why: a causal LM's output head turns every position's hidden state into a row of vocabulary logits, and the
loss then keeps only the positions whose next token is trained. In chat SFT most positions are prompt
(SmolLM2's ChatML headers and default system message are about 89% of a row), and the logits are
[tokens x vocabulary]: Llama 3's 128,256-token vocabulary at 8,192 tokens is 4.2 GB of fp32 logits per
sequence, before their gradient. This path never builds that tensor:
- The model runs with `logits_to_keep` set to a (B, T) boolean mask of the positions whose *shifted* label is
  trained (labels[:, t + 1] != -100), so transformers slices the final hidden states to those rows, flattened
  to (n, hidden). For that one call the output head's forward is the identity (`hidden_states_out`): the
  "logits" the model returns are those (n, hidden) states.
- `SupervisedLoss.__call__` (the Trainer's compute_loss_func) projects them through the head CHUNK rows at a
  time, sums each chunk's fp32 cross-entropy, and checkpoints the chunk, so backward recomputes its logits
  instead of keeping them: memory holds one (chunk, vocabulary) block, never (tokens, vocabulary).
- Normalised as the Trainer normalises the full path: the sum over the whole accumulated batch's supervised
  tokens (`num_items_in_batch`, counted over every micro-batch and process); without it (evaluation), the
  mean over this batch's supervised tokens.
Equal to the full-logits loss and gradients within float rounding (tests/test_train_loss.py: packed rows,
gradient accumulation, a tied head, padded batches).

Trade-offs
- The head runs twice on supervised rows (forward, then recomputed in backward): at 10% supervised positions
  that is 20% of the full path's head work.
- Models whose causal-LM forward changes the logits after the head (Gemma 2/3's final softcapping, Cohere's
  logit_scale, Granite's logits_scaling) or takes no `logits_to_keep` keep the full path (`unsupported_by`
  says why; the train stage logs it), as does any model when train.chunked_cross_entropy is false.
- The head is called through its class's forward outside the model's own call: a head that needs module
  hooks to run (parameters sharded or offloaded by FSDP or accelerate's device maps) is not supported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reprotune.loading import takes_logits_to_keep
from reprotune.packed import IGNORE_INDEX

CHUNK_ELEMENTS = 2**25  # logits per chunk: 128 MiB in fp32 (261 rows of Llama 3's 128,256-token vocabulary)
# config attributes by which a causal LM rescales its logits after the head (not reproduced by this path)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t predicts token t + 1, so it is kept when labels[:, t + 1] is trained."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def unsupported_by(model: nn.Module) -> str | None:
    """Why `model` (peft-wrapped or not) must keep the full-logits path, or None when it need not."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not takes_logits_to_keep(causal_lm):
        return f"{type(causal_lm).__name__}.forward takes no logits_to_keep"
    for name in LOGIT_TRANSFORMS:
        value = getattr(causal_lm.config, name, None)
        if value not in (None, 1, 1.0):
            return f"its logits are rescaled after the head (config.{name} = {value})"
    return None


class SupervisedLoss:
    """The Trainer's compute_loss_func for a model whose head `hidden_states_out` turns into the identity."""

    def __init__(self, model: nn.Module):
        self.head = model.get_output_embeddings()
        self.vocab_size = model.config.get_text_config().vocab_size

    @contextmanager
    def hidden_states_out(self) -> Iterator[None]:
        """The head's forward is the identity inside the block (the model returns hidden states as logits)."""
        self.head.forward = _identity
        try:
            yield
        finally:
            del self.head.forward  # the class's forward again

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits for `hidden` (rows, hidden) in fp32, through its class's forward."""
        return type(self.head).forward(self.head, hidden).float()

    def summed(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of (n, hidden) states against (n,) targets, one checkpointed chunk at a time."""
        rows = max(1, CHUNK_ELEMENTS // self.vocab_size)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            total = total + checkpoint(self._chunk, h, t, use_reentrant=False)
        return total

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.project(hidden), targets, reduction="sum")

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        hidden = outputs.logits  # (n, hidden): the supervised positions' final states, in batch order
        targets = labels[:, 1:][supervised_positions(labels)[:, :-1]].to(hidden.device)  # (n,)
        total = self.summed(hidden, targets)
        if num_items_in_batch is None:  # evaluation: this batch's mean, as the full path gives
            return total / max(1, targets.numel())
        return total / num_items_in_batch


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden

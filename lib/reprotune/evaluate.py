"""Evaluate: the base and the tuned (merged) model side by side on the validation split.

Features
- Sequences: evaluate.max_sequences validation sequences of data/packed, evenly spaced over the
  split (reprotune.packed.read_val_sequences, also the merge stage's verification source).
- Loss and perplexity: each sequence is scored alone (batch of one, positions 0..n-1, no padding),
  so no attention mask or packing kernel can leak one sequence into another. Loss is the mean
  cross-entropy over all supervised tokens (labels != -100) of all sequences, weighted by token,
  the way training computes it; perplexity = exp(loss). Logits are upcast to fp32 first.
- Exact match: prompt = the sequence's tokens before its first supervised label; reference = the
  supervised run from there up to the first stop token (exclusive) or the first unsupervised token.
  Stop tokens are the tokenizer's EOS and every `eos_token_id` of the generation config (ChatML's
  <|im_end|> too). Generation is greedy (argmax, first index on ties) for evaluate.max_new_tokens,
  cut at the first stop token; a match compares the decoded texts (special tokens skipped) after
  stripping whitespace. Sequences with no prompt (supervised from the first token) are not
  generated for.
- Outputs: the metrics (metrics/evaluate.json) and samples.jsonl, the first evaluate.num_samples
  prompts with reference, base and tuned answers side by side (moved to metrics/samples.jsonl).
- Both models use the same sequences, tokenizer (the tuned folder's) and dtype (the tuned model's
  stored dtype), on CUDA when available, else CPU. No sampling and no RNG: the figures are
  deterministic for given weights, data and hardware.

Trade-offs
- One sequence at a time, and a hand-written greedy loop (KV cache, batch of one) instead of
  `generate`: no padding side, mask or generation-config default (sampling, penalties) can change
  a figure. It costs throughput on a GPU: a 7B model over 200 sequences takes minutes, not seconds.
- A reference longer than max_new_tokens can never match; exact match is a strict check meant for
  short, checkable answers (the shipped sample tasks), not for open-ended text.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from reprotune import layout
from reprotune.config import Params
from reprotune.config.sections import EvaluateConfig
from reprotune.io import atomic_file
from reprotune.loading import load_model, stop_token_ids
from reprotune.packed import IGNORE_INDEX, ValSequence, read_val_sequences

log = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class EvaluateInputs:
    base: Path = layout.BASE
    tuned: Path = layout.MERGED
    packed: Path = layout.PACKED


@dataclass(frozen=True)
class Generation:
    index: int
    """Position of the sequence in the evaluated list."""
    prompt: list[int]
    reference: list[int]


def generation_of(index: int, seq: ValSequence, stops: set[int]) -> Generation | None:
    """Prompt and reference of a sequence, or None when it is supervised from its first token."""
    first = next((i for i, lab in enumerate(seq.labels) if lab != IGNORE_INDEX), None)
    if not first:  # None (nothing supervised) or 0 (no prompt to condition on)
        return None
    reference = []
    for tok, lab in zip(seq.input_ids[first:], seq.labels[first:]):
        if lab == IGNORE_INDEX or tok in stops:
            break
        reference.append(tok)
    return Generation(index, seq.input_ids[:first], reference)


@torch.no_grad()
def sequence_nll(model, seq: ValSequence) -> tuple[float, int]:
    """Summed cross-entropy over the supervised tokens of one sequence, and their count."""
    device = model.device
    ids = torch.tensor([seq.input_ids], device=device)
    # logits[t] predicts token t+1: (n-1, vocab) against labels[1:]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    target = torch.tensor(seq.labels[1:], device=device)
    mask = target != IGNORE_INDEX
    if not mask.any():
        return 0.0, 0
    nll = F.cross_entropy(logits[mask], target[mask], reduction="sum")
    return float(nll), int(mask.sum())


@torch.no_grad()
def greedy(model, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Greedy continuation of `prompt`, without the stop token that ended it."""
    ids = torch.tensor([prompt], device=model.device)
    out: list[int] = []
    cache = None
    for _ in range(max_new_tokens):
        step = model(input_ids=ids, cache=cache, use_cache=True)
        token = int(step.logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        cache, ids = step.cache, torch.tensor([[token]], device=model.device)
    return out


def score_model(
    model, seqs: list[ValSequence], gens: list[Generation], tokenizer, max_new_tokens: int, stops: set[int]
) -> tuple[dict, list[str]]:
    """Loss/perplexity/exact match of one model, and its decoded outputs for `gens`."""
    nll, tokens = 0.0, 0
    for seq in seqs:
        s, n = sequence_nll(model, seq)
        nll, tokens = nll + s, tokens + n
    outputs, matches = [], 0
    for g in gens:
        text = decode(tokenizer, greedy(model, g.prompt, max_new_tokens, stops))
        outputs.append(text)
        matches += text == decode(tokenizer, g.reference)
    loss = nll / tokens if tokens else None
    return {
        "sequences": len(seqs),
        "supervised_tokens": tokens,
        "loss": _round(loss),
        "perplexity": _round(math.exp(loss) if loss is not None else None),
        "generated": len(gens),
        "exact_match": _round(matches / len(gens) if gens else None),
        "exact_match_count": matches,
    }, outputs


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def evaluate(params: Params, inputs: EvaluateInputs, out_dir: Path) -> dict:
    """The stage core: base vs tuned metrics, with the sample generations in out_dir/samples.jsonl."""
    metrics, samples = compare(inputs.base, inputs.tuned, inputs.packed, params.evaluate, params.base.trust_remote_code)
    with atomic_file(Path(out_dir) / SAMPLES) as f:
        f.writelines(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in samples)
    return metrics


def compare(
    base_dir: Path, tuned_dir: Path, packed_dir: Path, cfg: EvaluateConfig, trust_remote_code: bool = False
) -> tuple[dict, list[dict]]:
    """Metrics of base vs tuned, and up to cfg.num_samples sample generations."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tuned_dir, trust_remote_code=trust_remote_code)
    stops = stop_token_ids(tuned_dir, tokenizer)
    seqs = read_val_sequences(packed_dir, cfg.max_sequences)
    if not seqs:
        log.warning("no validation sequences under %s/val: figures are empty", packed_dir)
    gens = [g for i, s in enumerate(seqs) if (g := generation_of(i, s, stops))]
    dtype = AutoConfig.from_pretrained(tuned_dir, trust_remote_code=trust_remote_code).dtype or torch.float32

    results, outputs = {}, {}
    for name, path in (("base", base_dir), ("tuned", tuned_dir)):
        model = load_model(path, dtype, trust_remote_code)
        results[name], outputs[name] = score_model(model, seqs, gens, tokenizer, cfg.max_new_tokens, stops)
        del model  # one model in memory at a time
        log.info("%s: loss %s, exact match %s", name, results[name]["loss"], results[name]["exact_match"])

    metrics = {
        **results,
        "dtype": str(dtype).removeprefix("torch."),
        "delta_loss": _delta(results, "loss"),
        "delta_exact_match": _delta(results, "exact_match"),
    }
    samples = [
        {
            "index": g.index,
            "prompt": tokenizer.decode(g.prompt),
            "reference": decode(tokenizer, g.reference),
            "base": outputs["base"][k],
            "tuned": outputs["tuned"][k],
        }
        for k, g in enumerate(gens[: cfg.num_samples])
    ]
    return metrics, samples


def _delta(results: dict, key: str) -> float | None:
    base, tuned = results["base"][key], results["tuned"][key]
    return None if base is None or tuned is None else _round(tuned - base)


def _round(x: float | None) -> float | None:
    # 6 decimals: enough to compare experiments, and hides last-bit noise from the printed figures
    return None if x is None else round(x, 6)

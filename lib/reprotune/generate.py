"""Answers from a causal LM, many prompts at a time: the one generation loop of the evaluate stage
(exact match, general prompts, the retention reference) and the replay stage (the base's own answers).

Features
- Prompts are batched by length (sorted, so little padding), left-padded with an attention mask and
  position ids counted from each prompt's first real token, with one KV cache per batch: the answers
  are those of one prompt at a time (tests/test_evaluate.py), unless two logits tie within float rounding.
- Greedy by default (argmax, first index on ties); with a temperature > 0, sampled from softmax(logits /
  temperature) with a seeded torch.Generator: the same answers for the same seed, prompts and batch size.
- Each answer ends at its first stop token (the tokenizer's EOS and every `eos_token_id` of the generation
  config: reprotune.loading.stop_token_ids), or after max_new_tokens. `with_stop` keeps the stop token at
  the end of an answer that reached one, so a caller can tell finished answers from cut ones.
- The head runs on the last position only (`logits_to_keep=1`) where the model's forward takes it.

Trade-offs
- A hand-written loop instead of `generate`, so no generation-config default (sampling, penalties) can
  change an answer, and the same code serves every model (4-bit with an adapter, merged, remote code).
"""

from __future__ import annotations

import torch

from reprotune.loading import takes_logits_to_keep

# A batch_size key's `auto`. On 2 CPU cores, SmolLM2-135M answered 96 prompts (32 new tokens) in 17.3 s at 16,
# 13.4 s at 32, 12.2 s at 48: past 32 the longest answer of a batch keeps the others waiting
BATCH_SIZE_AUTO = 32


def batch_size(value: int | str) -> int:
    """A batch_size key's value: a count, or `auto`."""
    return BATCH_SIZE_AUTO if value == "auto" else int(value)


@torch.no_grad()
def greedy_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    with_stop: bool = False,
) -> list[list[int]]:
    """Continuations of `prompts`, answered together: greedy, or sampled at `temperature` > 0 with
    `generator`. Each ends before the stop token that ended it (with it, when `with_stop`)."""
    device, n = model.device, len(prompts)
    width = max(map(len, prompts))
    # (n, width) left-padded: every prompt's last token in the last column, where the next token comes from
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # 0.. from each prompt's first real token
    out: list[list[int]] = [[] for _ in prompts]
    running = [True] * n
    cache = None
    last_position = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}  # the head on one row only
    for _ in range(max_new_tokens):
        step = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                     **last_position)  # fmt: skip
        logits = step.logits[:, -1].float()  # (n, vocab)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()  # on CPU: one generator for every device
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
        else:
            tokens = logits.argmax(-1).tolist()
        for i, token in enumerate(tokens):
            if running[i] and token in stops:
                running[i] = False
                if with_stop:
                    out[i].append(token)
            elif running[i]:
                out[i].append(token)
        if not any(running):
            break
        cache, ids = step.cache, torch.tensor(tokens, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def answers(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: set[int],
    batch_size: int,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    with_stop: bool = False,
    progress=None,
) -> list[list[int]]:
    """`greedy_batch` over `prompts` in batches of similar length (less padding), in the prompts' order.
    `progress`: a tqdm bar advanced by each batch's prompt count."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        done = greedy_batch(model, [prompts[i] for i in batch], max_new_tokens, stops, temperature=temperature,
                            generator=generator, with_stop=with_stop)  # fmt: skip
        out |= dict(zip(batch, done))
        if progress is not None:
            progress.update(len(batch))
    return [out[i] for i in range(len(prompts))]


def chat_prompt(tokenizer, question: str) -> list[int]:
    """A question as the model is served: one user turn through the chat template (generation prompt
    added), or the raw text when the tokenizer has no template."""
    if not tokenizer.chat_template:
        return tokenizer.encode(question)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, ids: list[int]) -> str:
    """An answer's text: special tokens skipped, whitespace stripped at both ends."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()

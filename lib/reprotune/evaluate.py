"""Evaluate: the base and the tuned (merged) model side by side on the validation split.

Features
- Sequences: rows of data/packed/val/part-*.parquet (file order, then row order) unpacked by
  `seq_lens` (a packed row holds several sequences back to back). evaluate.max_sequences of them,
  evenly spaced over the split: packing orders sequences by length, so the first N would be the
  longest N. `read_val_sequences` is also the merge stage's source of verification sequences.
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

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValSequence:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; -100 where the token is not supervised (HF convention, unshifted)."""


@dataclass(frozen=True)
class Generation:
    index: int
    """Position of the sequence in the evaluated list."""
    prompt: list[int]
    reference: list[int]


def read_val_sequences(packed_dir: Path, limit: int) -> list[ValSequence]:
    """`limit` validation sequences evenly spaced over the split (all when fewer), unpacked, in
    split order; [] when there is no validation split."""
    import pyarrow.parquet as pq

    parts = sorted((Path(packed_dir) / "val").glob("part-*.parquet"))
    # Pass 1 reads seq_lens only: how many sequences each part holds.
    counts = [sum(map(len, pq.read_table(p, columns=["seq_lens"]).column("seq_lens").to_pylist())) for p in parts]
    total = sum(counts)
    wanted = sorted({i * total // limit for i in range(limit)}) if total > limit else list(range(total))
    out: list[ValSequence] = []
    first = 0  # index of the part's first sequence in the split
    for part, count in zip(parts, counts):
        local = [i - first for i in wanted if first <= i < first + count]
        if local:
            out += _unpack(pq.read_table(part, columns=["input_ids", "labels", "seq_lens"]), set(local))
        first += count
    return out


def _unpack(table, keep: set[int]) -> list[ValSequence]:
    """Sequences number `keep` (counted across the table's rows) of a packed table."""
    out, k = [], 0
    for ids, labels, lens in zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels", "seq_lens"))):
        start = 0
        for n in lens:
            if k in keep:
                out.append(ValSequence(ids[start : start + n], labels[start : start + n]))
            start, k = start + n, k + 1
    return out


def stop_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS of the tokenizer plus every eos_token_id of the generation config (end of turn too)."""
    from transformers import GenerationConfig

    stops = {tokenizer.eos_token_id} - {None}
    if (Path(model_dir) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return stops


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
    past = None
    for _ in range(max_new_tokens):
        step = model(input_ids=ids, past_key_values=past, use_cache=True)
        token = int(step.logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        past, ids = step.past_key_values, torch.tensor([[token]], device=model.device)
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


def load_model(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def evaluate(
    base_dir: Path,
    tuned_dir: Path,
    packed_dir: Path,
    max_sequences: int,
    max_new_tokens: int,
    num_samples: int,
    trust_remote_code: bool = False,
) -> tuple[dict, list[dict]]:
    """Metrics of base vs tuned, and up to `num_samples` sample generations."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tuned_dir, trust_remote_code=trust_remote_code)
    stops = stop_token_ids(tuned_dir, tokenizer)
    seqs = read_val_sequences(packed_dir, max_sequences)
    if not seqs:
        log.warning("no validation sequences under %s/val: figures are empty", packed_dir)
    gens = [g for i, s in enumerate(seqs) if (g := generation_of(i, s, stops))]
    dtype = AutoConfig.from_pretrained(tuned_dir, trust_remote_code=trust_remote_code).dtype or torch.float32

    results, outputs = {}, {}
    for name, path in (("base", base_dir), ("tuned", tuned_dir)):
        model = load_model(path, dtype, trust_remote_code)
        results[name], outputs[name] = score_model(model, seqs, gens, tokenizer, max_new_tokens, stops)
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
        for k, g in enumerate(gens[:num_samples])
    ]
    return metrics, samples


def _delta(results: dict, key: str) -> float | None:
    base, tuned = results["base"][key], results["tuned"][key]
    return None if base is None or tuned is None else _round(tuned - base)


def _round(x: float | None) -> float | None:
    # 6 decimals: enough to compare experiments, and hides last-bit noise from the printed figures
    return None if x is None else round(x, 6)

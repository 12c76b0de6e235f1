"""Evaluate: the base, the model as trained and the model as shipped, side by side on the validation split.

Features
- Three models on the same sequences: `base`; `as_trained`, the adapter on the base as training loaded
  it (4-bit under QLoRA, settings from reprotune.quant, in the training's compute dtype): the model whose
  loss training minimised; `as_shipped`, the merged checkpoint (models/merged): the model users get.
  QLoRA trains against 4-bit weights and the merge folds into 16-bit ones (merge.fold_into), so the two
  differ; `shipped_vs_trained` gives the gap in loss, exact match and the count of answers that differ.
- Sequences: evaluate.max_sequences validation sequences of data/packed, evenly spaced over the
  split (reprotune.packed.read_val_sequences, also the merge stage's verification source).
- Loss and perplexity: sequences are scored evaluate.batch_size at a time, right-padded with an
  attention mask (a causal model's tokens never see the padding after them; positions 0..n-1 in every
  row), so each is scored as alone and no packing kernel can leak one sequence into another. Only the
  positions whose next token is supervised go through the output head (`logits_to_keep`): no
  (tokens, vocabulary) logits (a model whose forward lacks the argument computes them all, then keeps
  those). Loss is the mean cross-entropy over all supervised tokens (labels != -100) of all sequences,
  weighted by token, the way training computes it; perplexity = exp(loss). Logits are upcast to fp32
  first.
- Exact match: prompt = the sequence's tokens before its first supervised label; reference = the
  supervised run from there up to the first stop token (exclusive) or the first unsupervised token.
  Stop tokens are the tokenizer's EOS and every `eos_token_id` of the generation config (ChatML's
  <|im_end|> too). Generation is greedy (argmax, first index on ties) for evaluate.max_new_tokens,
  evaluate.batch_size prompts at a time (reprotune.generate), cut at the first stop token; a match
  compares the decoded texts (special tokens skipped) after stripping whitespace. Sequences with
  no prompt (supervised from the first token) are not generated for.
- General prompts (evaluate.prompts): questions outside the training tasks, rendered with the
  tokenizer's chat template (as a single user turn, generation prompt added; raw text when there is
  no template) and answered greedily by every model: what fine-tuning kept or lost, to read.
- Retention (evaluate.general_prompts, 240 everyday prompts shipped in data/prompts/general.jsonl): the
  base answers each greedily (up to evaluate.general_max_new_tokens, with the stop token that ended it);
  those answers are the reference, so no external data or judge is needed. Every model is scored on them
  as on validation sequences: `nll`, the mean cross-entropy per reference token (the base's own is its
  floor), and `begins_as_base`, the share of prompts whose first 8 reference tokens are each the model's
  argmax, i.e. whose greedy answer would begin as the base's (read off the same forward pass: no
  generation per model). `retention.delta_nll` is the shipped model's rise over the base: forgetting.
- Outputs: the metrics (metrics/evaluate.json); samples.jsonl: the first evaluate.num_samples
  validation prompts with the reference and every model's answer side by side, then the general
  prompts (moved to metrics/samples.jsonl); models.json, a record per model (loss, exact match,
  retention) that dvc.yaml declares as a plot, so `dvc plots diff` sets experiments side by side.
- All models use the same sequences and tokenizer (the merged folder's); base and as_shipped the
  merged model's stored dtype, on CUDA when available, else CPU. No sampling and no RNG: the figures
  are deterministic for given weights, data and hardware.

Trade-offs
- A hand-written greedy loop (reprotune.generate) instead of `generate`, so no generation-config default
  (sampling, penalties) can change a figure; batched answers are those of one prompt at a time
  (tests/test_evaluate.py), unless two logits tie within float rounding. The base's own begins_as_base is
  1.0 but for such ties between its cached generation and the scoring pass.
- A reference longer than max_new_tokens can never match; exact match is a strict check meant for
  short, checkable answers (the shipped sample tasks), not for open-ended text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from reprotune import layout
from reprotune.config import Params
from reprotune.config.sections import EvaluateConfig
from reprotune.files import read_prompts
from reprotune.generate import answers, batch_size, chat_prompt, decode
from reprotune.io import atomic_file, write_json
from reprotune.loading import load_model, read_config, stop_token_ids, stored_dtype, takes_logits_to_keep
from reprotune.packed import IGNORE_INDEX, ValSequence, read_val_sequences
from reprotune.quant import load_as_trained

log = logging.getLogger(__name__)
SAMPLES = "samples.jsonl"
MODELS = "models.json"  # one record per model, the figures experiments are compared on (dvc.yaml's plots)
RETENTION_PREFIX = 8  # an answer "begins as the base's" when its first 8 tokens are the base's


@dataclass(frozen=True)
class EvaluateInputs:
    base: Path = layout.BASE
    adapter: Path = layout.ADAPTER
    merged: Path = layout.MERGED
    packed: Path = layout.PACKED
    repo_root: Path = Path(".")
    """evaluate.general_prompts is read relative to it."""


Loader = Callable[[], torch.nn.Module]  # loads one model when called: one model in memory at a time


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


@dataclass
class Scores:
    """Summed over sequences scored together."""

    nll: float = 0.0
    """Cross-entropy summed over the supervised tokens."""
    tokens: int = 0
    """Supervised tokens."""
    prefix_matches: int = 0
    """Sequences whose first RETENTION_PREFIX supervised tokens (all, when fewer) are each the model's argmax:
    its greedy answer would begin with them."""

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.nll + other.nll, self.tokens + other.tokens, self.prefix_matches + other.prefix_matches)


@torch.no_grad()
def batch_scores(model, seqs: list[ValSequence]) -> Scores:
    """Scores of `seqs`, scored together. Rows are right-padded: a causal model's real tokens never see the
    padding after them, and positions count from 0 in every row, so each sequence is scored as it would be
    alone."""
    device, width = model.device, max(len(s.input_ids) for s in seqs)
    ids = torch.tensor([s.input_ids + [0] * (width - len(s.input_ids)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in seqs], device=device)
    labels = torch.tensor([s.labels + [IGNORE_INDEX] * (width - len(s.labels)) for s in seqs], device=device)
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX  # position t predicts token t + 1
    if not supervised.any():
        return Scores()
    keep = torch.cat([supervised, supervised.new_zeros(len(seqs), 1)], dim=1)  # (B, width) bool: the head's rows
    if takes_logits_to_keep(model):  # (supervised, vocab): the head runs on the kept rows only, in row order
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits.float()
    else:  # a model without the argument (remote code): every position's logits, then the kept rows
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[keep].float()
    logits = logits.reshape(-1, logits.shape[-1])  # (supervised, vocab), row by row
    nll = F.cross_entropy(logits, target[supervised], reduction="sum")
    # (supervised,) the rank of each supervised token within its row: the first RETENTION_PREFIX must be argmax
    rank = (supervised.cumsum(1) - 1)[supervised]
    missed = (logits.argmax(-1) != target[supervised]) & (rank < RETENTION_PREFIX)
    row = supervised.nonzero()[:, 0]  # (supervised,) the row of each
    rows_with_labels = int(supervised.any(1).sum())
    return Scores(float(nll), int(supervised.sum()), rows_with_labels - int(row[missed].unique().numel()))


def scores_of(model, seqs: list[ValSequence], batch: int) -> Scores:
    """`batch_scores` over `seqs` in batches of similar length; the sums are order-free."""
    return sum((batch_scores(model, chunk) for chunk in by_length(seqs, batch)), Scores())


def by_length(seqs: list[ValSequence], batch_size: int) -> list[list[ValSequence]]:
    """`seqs` in batches of similar length (sorted: little padding); the sum over them is order-free."""
    ordered = sorted(seqs, key=lambda s: len(s.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def score_model(
    model,
    seqs: list[ValSequence],
    gens: list[Generation],
    tokenizer,
    cfg: EvaluateConfig,
    stops: set[int],
    prompts: list[list[int]] = (),
) -> tuple[dict, list[str], list[str]]:
    """Loss/perplexity/exact match of one model, its decoded outputs for `gens`, and its answers to the
    general `prompts` (token ids)."""
    batch = batch_size(cfg.batch_size)
    scores = scores_of(model, seqs, batch)
    nll, tokens = scores.nll, scores.tokens
    texts = [decode(tokenizer, ids) for ids in answers(model, [g.prompt for g in gens] + list(prompts),
                                                       cfg.max_new_tokens, stops, batch)]  # fmt: skip
    outputs, general = texts[: len(gens)], texts[len(gens) :]
    matches = sum(text == decode(tokenizer, g.reference) for text, g in zip(outputs, gens))
    loss = nll / tokens if tokens else None
    return (
        {
            "sequences": len(seqs),
            "supervised_tokens": tokens,
            "loss": _round(loss),
            "perplexity": _round(math.exp(loss) if loss is not None else None),
            "generated": len(gens),
            "exact_match": _round(matches / len(gens) if gens else None),
            "exact_match_count": matches,
        },
        outputs,
        general,
    )


def evaluate(params: Params, inputs: EvaluateInputs, out_dir: Path) -> dict:
    """The stage core: base, as-trained and as-shipped metrics, with the sample generations in
    out_dir/samples.jsonl. Reads the evaluate section, base.trust_remote_code, and the quant section with
    train.bf16 / train.fp16 (to load the base as training did)."""
    trust = params.base.trust_remote_code
    dtype = getattr(torch, stored_dtype(read_config(inputs.merged)) or "float32")
    loaders = {
        "base": lambda: load_model(inputs.base, dtype, trust),
        "as_trained": lambda: load_as_trained(inputs.base, inputs.adapter, params.quant, params.train, trust),
        "as_shipped": lambda: load_model(inputs.merged, dtype, trust),
    }
    cfg = params.evaluate
    general = [q for _, q in read_prompts(inputs.repo_root / cfg.general_prompts)] if cfg.general_prompts else []
    metrics, samples = compare(loaders, inputs.merged, inputs.packed, cfg, trust, general)
    with atomic_file(Path(out_dir) / SAMPLES) as f:
        f.writelines(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in samples)
    write_json(Path(out_dir) / MODELS, model_records(metrics))
    return {**metrics, "dtype": str(dtype).removeprefix("torch.")}


def compare(
    loaders: dict[str, Loader],
    tokenizer_dir: Path,
    packed_dir: Path,
    cfg: EvaluateConfig,
    trust_remote_code=False,
    general: list[str] = (),
) -> tuple[dict, list[dict]]:
    """Metrics of each model (`base` first), up to cfg.num_samples validation generations and the answers to
    cfg.prompts; with `general` questions, the retention block (`retention_reference`, `retention`). Each
    loader is called once, its model freed before the next."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    stops = stop_token_ids(tokenizer_dir, tokenizer)
    seqs = read_val_sequences(packed_dir, cfg.max_sequences)
    if not seqs:
        log.warning("no validation sequences under %s/val: figures are empty", packed_dir)
    gens = [g for i, s in enumerate(seqs) if (g := generation_of(i, s, stops))]
    prompts = [chat_prompt(tokenizer, q) for q in cfg.prompts]
    questions = [chat_prompt(tokenizer, q) for q in general]

    results, outputs, replies, retained, reference = {}, {}, {}, {}, []
    for name, load in loaders.items():
        model = load()
        results[name], outputs[name], replies[name] = score_model(model, seqs, gens, tokenizer, cfg, stops, prompts)
        if questions:
            if name == "base":  # the base's own answers are the reference every model is scored on
                reference = retention_reference(model, questions, cfg, stops)
            retained[name] = score_retention(model, reference, cfg)
        del model  # one model in memory at a time
        log.info("%s: loss %s, exact match %s", name, results[name]["loss"], results[name]["exact_match"])

    metrics = dict(results)
    if {"base", "as_shipped"} <= set(results):
        metrics["delta_loss"] = _delta(results, "base", "as_shipped", "loss")
        metrics["delta_exact_match"] = _delta(results, "base", "as_shipped", "exact_match")
    if retained:
        metrics["retention"] = retention_block(retained, reference)
    if {"as_trained", "as_shipped"} <= set(results):
        trained, shipped = outputs["as_trained"], outputs["as_shipped"]
        metrics["shipped_vs_trained"] = {
            "loss": _delta(results, "as_trained", "as_shipped", "loss"),
            "exact_match": _delta(results, "as_trained", "as_shipped", "exact_match"),
            "answers_differ": sum(a != b for a, b in zip(trained, shipped)),
        }
    samples = [
        {"index": g.index, "prompt": tokenizer.decode(g.prompt), "reference": decode(tokenizer, g.reference)}
        | {name: outputs[name][k] for name in loaders}
        for k, g in enumerate(gens[: cfg.num_samples])
    ]
    samples += [
        {"index": None, "prompt": tokenizer.decode(p), "reference": None} | {name: replies[name][k] for name in loaders}
        for k, p in enumerate(prompts)
    ]
    return metrics, samples


def model_records(metrics: dict) -> list[dict]:
    """A record per model (base, as trained, as shipped): loss, exact match, and the retention figures when
    measured. What `dvc plots diff` draws side by side for experiments."""
    retention = metrics.get("retention", {})
    return [
        {"model": name, "loss": m["loss"], "exact_match": m["exact_match"]}
        | (
            {"retention_nll": retention[name]["nll"], "begins_as_base": retention[name]["begins_as_base"]}
            if name in retention
            else {}
        )  # fmt: skip
        for name, m in metrics.items()
        if name in ("base", "as_trained", "as_shipped")
    ]


def retention_reference(model, questions: list[list[int]], cfg: EvaluateConfig, stops: set[int]) -> list[ValSequence]:
    """The base's greedy answers to the general questions, as sequences supervised on the answer (with the stop
    token that ended it, if any: knowing when to stop is part of the answer)."""
    batch = batch_size(cfg.batch_size)
    said = answers(model, questions, cfg.general_max_new_tokens, stops, batch, with_stop=True)
    return [ValSequence(q + a, [IGNORE_INDEX] * len(q) + a) for q, a in zip(questions, said)]


def score_retention(model, reference: list[ValSequence], cfg: EvaluateConfig) -> dict:
    """A model's mean NLL on the base's answers, and how many of its own greedy answers would begin as the
    base's (the first RETENTION_PREFIX tokens)."""
    scores = scores_of(model, reference, batch_size(cfg.batch_size))
    return {
        "nll": _round(scores.nll / scores.tokens),
        "begins_as_base": _round(scores.prefix_matches / len(reference)),
        "begins_as_base_count": scores.prefix_matches,
    }


def retention_block(retained: dict[str, dict], reference: list[ValSequence]) -> dict:
    """metrics/evaluate.json's `retention`: each model's figures on the base's answers, and the shipped model's
    change from the base."""
    block = {
        "prompts": len(reference),
        "reference_tokens": sum(IGNORE_INDEX != lab for s in reference for lab in s.labels),
        "prefix_tokens": RETENTION_PREFIX,
        **retained,
    }
    if {"base", "as_shipped"} <= set(retained):
        block["delta_nll"] = _delta(retained, "base", "as_shipped", "nll")
    return block


def _delta(results: dict, before: str, after: str, key: str) -> float | None:
    a, b = results[before][key], results[after][key]
    return None if a is None or b is None else _round(b - a)


def _round(x: float | None) -> float | None:
    # 6 decimals: enough to compare experiments, and hides last-bit noise from the printed figures
    return None if x is None else round(x, 6)

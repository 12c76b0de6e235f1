"""The replay stage's core: the base model's own answers to a prompt set, as training records that keep
what the base knew (data.replay).

A fine-tune moves the model towards its tasks and away from everything else it answered well: forgetting.
Training on the base's own answers beside the task data (replay; self-distillation when the prompts are
the training data's own instructions, arXiv 2402.13669) pulls the tuned model back towards the base
wherever the tasks do not need it to move. The answers come from the base itself, so no external data or
judge is needed.

Features
- Sources (data.replay.source): `prompts`, a prompt file under data/prompts/ (the shipped replay.jsonl
  holds 400 everyday prompts, none of them in the evaluate stage's general set, so replay never trains
  on the retention measurement); `self`, the instructions of the validated training records (an alpaca
  record's instruction, and its input after a blank line; a conversation's first user turn; completion
  records have none; data.test_datasets' records are left out). `none` writes an empty record file
  without loading the model.
- Prompts are rendered as served (one user turn through the chat template, generation prompt added) and
  answered by the base in its stored dtype, data.replay.batch_size at a time (reprotune.generate):
  greedy, or sampled at data.replay.temperature with data.replay.seed. At most max_prompts of them, drawn
  with the seed and kept in file order.
- An answer that has not ended within max_new_tokens is kept as cut, marked so (records.REPLAY_CUT) that
  tokenize trains its text but not the end-of-turn token after it: the model learns how the base begins an
  answer without learning to stop mid-sentence, and no generated answer is wasted. Empty answers are
  dropped; all three are counted.
- Outputs (in the folder given, swapped in atomically): records.parquet, validated records in the format
  of reprotune.records (type chat: the user prompt and the base's answer), each with its provenance:
  `source` the prompt file (or data/validated/records.parquet for self) and `line` its line (for self:
  the record's row in that file, from 1, so tokenize can keep replays of validation records out of
  training); replay.json, how they were made (source, settings, the base's provenance, the prompt file's
  SHA-256). The tokenize stage mixes them in at data.replay.weight's share of the training sequences.
- Deterministic: greedy answers depend only on the base's weights, the prompts and the hardware; seeded
  sampling also on the batch size. Same inputs, byte-identical outputs (tests/test_replay.py).

Trade-offs
- The replay is generated once per base and prompt set and cached by DVC: a changed learning rate or
  LoRA rank reuses it. The stage lists data/validated/records.parquet among its dependencies for the self
  source, so with the prompts source a change of the training data reruns it too (DVC dependencies cannot
  depend on a key); its output is then byte-identical and nothing downstream reruns for it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from reprotune import layout
from reprotune.config import Params
from reprotune.config.sections import ReplayConfig
from reprotune.errors import BadInput
from reprotune.files import read_prompts
from reprotune.generate import answers, batch_size, chat_prompt, decode
from reprotune.io import sha256_file, write_json
from reprotune.loading import PROVENANCE_FILE, load_model, read_config, stop_token_ids, stored_dtype
from reprotune.records import DATASETS, RECORDS, REPLAY_CUT, SELF_SOURCE, RecordsWriter, read_datasets, record_id

log = logging.getLogger(__name__)
MANIFEST = "replay.json"


@dataclass(frozen=True)
class ReplayInputs:
    base: Path = layout.BASE
    records: Path = layout.VALIDATED / RECORDS
    """The training data: the prompts of the self source."""
    datasets: Path = layout.VALIDATED / DATASETS
    repo_root: Path = Path(".")
    """data.replay.prompts is read relative to it."""


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str
    line: int
    """Line of the prompt file (from 1), or row of records.parquet (from 1) for the self source."""


def training_prompts(records: Path, datasets: Path) -> list[Prompt]:
    """The instruction of every training record (self-distillation): alpaca instruction (+ input), a
    conversation's first user turn; none for completion records and validation-set records."""
    test = {i for i, e in enumerate(read_datasets(datasets)) if e.test}
    columns = ["dataset", "type", "instruction", "input", "messages"]
    out, row = [], 0
    for batch in pq.ParquetFile(records).iter_batches(batch_size=10_000, columns=columns):
        for r in batch.to_pylist():
            row += 1
            if r["dataset"] in test:
                continue
            if r["type"] == "alpaca":
                text = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            elif r["type"] == "chat":
                text = next((m["content"] for m in r["messages"] if m["role"] == "user"), None)
            else:
                text = None
            if text:
                out.append(Prompt(text, SELF_SOURCE, row))
    return out


def draw(prompts: list[Prompt], max_prompts: int | None, seed: int) -> list[Prompt]:
    """At most max_prompts of `prompts`, drawn with `seed`, in their original order."""
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    # Generator([seed, 1]), not Generator(seed): tokenize draws the validation split with Generator(seed),
    # and the same stream over the same records would pick exactly the validation records for self-replay
    chosen = np.sort(np.random.default_rng([seed, 1]).permutation(len(prompts))[:max_prompts])
    return [prompts[i] for i in chosen]


def replay_record(prompt: Prompt, answer: str, cut: bool) -> dict:
    """A validated chat record (reprotune.records' columns): the prompt and the base's answer, `dataset`
    REPLAY_CUT when the answer was cut at max_new_tokens."""
    row = {
        "type": "chat",
        "system": None,
        "instruction": None,
        "input": None,
        "output": None,
        "messages": [{"role": "user", "content": prompt.text}, {"role": "assistant", "content": answer}],
        "text": None,
    }
    return {**row, "id": record_id(row), "source": prompt.source, "line": prompt.line, "dataset": REPLAY_CUT * cut}


def replay(params: Params, inputs: ReplayInputs, out_dir: Path) -> dict:
    """The stage core: the base's answers to the data.replay prompts in out_dir; returns the metrics.
    Reads data.replay and base.trust_remote_code."""
    cfg = params.data.replay
    prompts = collect_prompts(cfg, inputs)
    records, figures = [], {"source": cfg.source, "prompts": len(prompts)}
    provenance = {}
    if prompts:
        trust = params.base.trust_remote_code
        records, generated = answer_prompts(inputs.base, prompts, cfg, trust)
        figures |= generated
        record = inputs.base / PROVENANCE_FILE  # the base stage's; absent from a folder made otherwise
        provenance = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    with RecordsWriter(Path(out_dir) / RECORDS) as writer:
        if records:
            writer.write(records)
    manifest = {
        "settings": {k: getattr(cfg, k) for k in ("source", "max_prompts", "max_new_tokens", "temperature", "seed")},
        "prompts_file": cfg.prompts if cfg.source == "prompts" else None,
        "prompts_sha256": sha256_file(inputs.repo_root / cfg.prompts) if cfg.source == "prompts" else None,
        "base": {k: provenance.get(k) for k in ("model", "source", "revision", "commit_sha")},
        "records": len(records),
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return {**figures, "records": len(records)}


def collect_prompts(cfg: ReplayConfig, inputs: ReplayInputs) -> list[Prompt]:
    if cfg.source == "none":
        return []
    if cfg.source == "prompts":
        prompts = [Prompt(text, cfg.prompts, line) for line, text in read_prompts(inputs.repo_root / cfg.prompts)]
    else:
        prompts = training_prompts(inputs.records, inputs.datasets)
        if not prompts:
            raise BadInput("data.replay.source is self, but no training record has an instruction to answer")
    return draw(prompts, cfg.max_prompts, cfg.seed)


def answer_prompts(base: Path, prompts: list[Prompt], cfg: ReplayConfig, trust: bool) -> tuple[list[dict], dict]:
    """The base's answers as records (non-empty ones), and the counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust)
    stops = stop_token_ids(base, tokenizer)
    model = load_model(base, getattr(torch, stored_dtype(read_config(base)) or "float32"), trust)
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = [chat_prompt(tokenizer, p.text) for p in prompts]
    batch = batch_size(cfg.batch_size)
    with tqdm(total=len(ids), desc="replay: base answers", unit="prompt", mininterval=2) as bar:
        outs = answers(model, ids, cfg.max_new_tokens, stops, batch, temperature=cfg.temperature,
                       generator=generator, with_stop=True, progress=bar)  # fmt: skip
    records, cut, empty, tokens = [], 0, 0, 0
    for prompt, out in zip(prompts, outs):
        ended = bool(out) and out[-1] in stops
        text = decode(tokenizer, out[:-1] if ended else out)
        if not text:
            empty += 1
            continue
        cut += not ended
        tokens += len(out)
        records.append(replay_record(prompt, text, cut=not ended))
    if not records:
        raise BadInput(f"data.replay: the base answered none of the {len(prompts)} prompts with text")
    log.info("replay: %d of %d answers kept, %d of them cut at max_new_tokens (%d empty, dropped)", len(records),
             len(prompts), cut, empty)  # fmt: skip
    return records, {"cut": cut, "dropped_empty": empty, "answer_tokens": tokens}

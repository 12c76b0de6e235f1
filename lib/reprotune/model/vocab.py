"""Tokens added to the base vocabulary (base.tokens, new base.special_tokens): the embedding rows they need.

Features
- `grow_embeddings` gives models/base one embedding row per new token: every 2-D tensor of shape
  (vocab_size, hidden_size) (the input embedding and, when untied, the output head) grows to the
  tokenizer's length, config.json's vocab_size with it. A new row is the mean of the matrix's existing
  rows: a neutral start (a new token's logit is about the average one, not a random spike) and
  deterministic, where HF's resize_token_embeddings samples from a distribution fitted to the old rows.
- Tensor-level: the tensors are found from the safetensors headers and config.json, so no model is built
  (no remote code, no weights in memory but the matrix being grown). Only the shard(s) holding a grown
  matrix are rewritten (reprotune.tensors, other tensors copied in header order), then
  model.safetensors.index.json's total_size; every file is written beside its target and renamed over it.
- The record (reprotune.loading.added_record, which owns its format) lists the new tokens with their ids
  and the rows before/after; it goes into the base provenance (reprotune_base.json, key "tokenizer"),
  where training reads the ids (reprotune.loading.added_token_ids) to train those rows. A base with spare
  rows (rows >= tokenizer length, e.g. padded to a multiple of 64) is not resized, but its new ids are
  recorded all the same: their rows are as untrained as grown ones.

Trade-offs
- The mean is summed in float64 in fixed row blocks, then rounded to the stored dtype: bit-stable for a
  given torch build, and the same on any core count up to float64's last bits (which the rounding hides).
- A rewritten shard gets reprotune.tensors' header (metadata {"format": "pt"}): any other metadata the
  source shard had is not kept.
- A checkpoint where another tensor happens to have the embedding's shape would grow too; a model whose
  embedding is not (vocab_size, hidden_size), e.g. factorised, is refused rather than guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reprotune.errors import BadInput
from reprotune.io import atomic_files, write_json
from reprotune.loading import read_config
from reprotune.tensors import INDEX_NAME, TensorRef, read_index, read_tensor, write_safetensors

MEAN_BLOCK_ROWS = 4096  # rows summed per step: bounds the float64 copy, fixes the summation order


def grow_embeddings(model_dir: Path, rows: int) -> dict[str, int]:
    """Grow the embedding matrices of the checkpoint in `model_dir` to `rows` rows (when they have fewer);
    returns {"before": rows then, "after": rows now}."""
    config = read_config(model_dir)
    text = config.get("text_config", config)  # multimodal configs keep the language model's sizes there
    before = text["vocab_size"]
    if rows <= before:
        return {"before": before, "after": before}  # spare rows: the new ids already have one
    refs = read_index(model_dir)
    names = embedding_names(refs, before, text.get("hidden_size"))
    for file in sorted({refs[n].file for n in names}):
        _rewrite_shard(file, refs, names, rows)
    _update_index(model_dir, read_index(model_dir))
    text["vocab_size"] = rows
    write_json(Path(model_dir) / "config.json", config)
    return {"before": before, "after": rows}


def embedding_names(refs: dict[str, TensorRef], vocab: int, hidden: int | None) -> list[str]:
    """Tensors shaped (vocab, hidden): the input embedding, and the output head when it is stored apart
    (`hidden` None: a config that names it otherwise; any 2-D tensor with `vocab` rows)."""
    names = sorted(
        n for n, r in refs.items() if len(r.shape) == 2 and r.shape[0] == vocab and hidden in (None, r.shape[1])
    )
    if not 1 <= len(names) <= 2:
        raise BadInput(
            f"base.tokens / base.special_tokens: new tokens need the input embedding (and an output head) as "
            f"({vocab}, {hidden or 'hidden'}) tensors of the base checkpoint; found {len(names)}: {names[:4]}"
        )
    return names


def mean_row(weight: torch.Tensor) -> torch.Tensor:
    """The mean of `weight`'s rows in its dtype, summed in float64 block by block (fixed order)."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    for block in weight.split(MEAN_BLOCK_ROWS):
        total += block.double().sum(0)
    return (total / weight.shape[0]).to(weight.dtype)


def grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended up to `rows`, each the mean of the existing ones."""
    extra = mean_row(weight).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra])


def _rewrite_shard(file: Path, refs: dict[str, TensorRef], names: list[str], rows: int) -> None:
    """Write `file` again with the tensors in `names` grown to `rows` rows, the others as they were (in their
    original order), one tensor in memory at a time."""
    order = sorted((n for n, r in refs.items() if r.file == file), key=lambda n: refs[n].begin)

    def shape(n: str) -> tuple[int, ...]:
        return (rows, *refs[n].shape[1:]) if n in names else refs[n].shape

    def tensors(handle):
        for n in order:
            t = read_tensor(refs[n], handle)
            yield grown(t, rows) if n in names else t

    specs = [(n, refs[n].dtype, shape(n)) for n in order]
    with atomic_files({file.name: file}) as tmp, open(file, "rb") as handle:
        write_safetensors(tmp / file.name, specs, tensors(handle))


def _update_index(model_dir: Path, refs: dict[str, TensorRef]) -> None:
    """A sharded checkpoint's index records the total size; its weight map (names to files) is unchanged."""
    path = Path(model_dir) / INDEX_NAME
    if not path.is_file():
        return
    index = json.loads(path.read_text(encoding="utf-8"))
    metadata = index.setdefault("metadata", {})
    metadata["total_size"] = sum(r.end - r.begin for r in refs.values())
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(r.numel for r in refs.values())
    write_json(path, index)

"""Training rows from data/packed and the two collators that turn them into micro-batches.

- `PackedRows`: one split (`<split>/part-*.parquet`) held as flat numpy columns plus row offsets,
  so a multi-GB split costs one copy and no Python object per token. Rows are checked on load
  (sum(seq_lens) == len(input_ids) == len(labels)); a bad row is bad input (exit 2).
- `collate_padding_free`: the micro-batch's rows are concatenated into ONE row (1, total_tokens),
  no padding and no attention mask. Each sequence is told apart by position_ids restarting at 0,
  which transformers turns into a block-diagonal mask (sdpa/eager) or varlen cu_seqlens (flash).
- `PaddedCollator`: rows padded on the right to the longest in the micro-batch, with an
  attention mask; used when the data was tokenized with sample_packing off.

Both collators set the label of every sequence's first token to -100: a causal LM predicts token
t from tokens < t, so in a concatenated row the first token of sequence k would otherwise be a
target predicted from the end of sequence k-1. (It is never a target inside its own sequence.)
position_ids are rebuilt from seq_lens rather than read, so seq_lens is the one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reprotune.errors import BadInput

COLUMNS = ("input_ids", "labels", "seq_lens")
IGNORE = -100


class PackedDataError(BadInput):
    """data/packed is missing or malformed."""


def read_manifest(packed_dir: Path) -> dict:
    path = Path(packed_dir) / "manifest.json"
    if not path.is_file():
        raise PackedDataError(f"{path} not found: run the tokenize stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def split_files(packed_dir: Path, split: str) -> list[Path]:
    return sorted((Path(packed_dir) / split).glob("part-*.parquet"))


class PackedRows:
    """Map-style dataset over one split; item i is a dict of int64 arrays (input_ids, labels, seq_lens)."""

    def __init__(self, packed_dir: Path, split: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = split_files(packed_dir, split)
        if not files:
            raise PackedDataError(f"{Path(packed_dir) / split}: no part-*.parquet files; run the tokenize stage first")
        table = pa.concat_tables([pq.read_table(f, columns=list(COLUMNS)) for f in files])
        self._columns = {name: _flat(table.column(name).combine_chunks()) for name in COLUMNS}
        self._check(Path(packed_dir) / split)

    def __len__(self) -> int:
        return len(self._columns["input_ids"][1]) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in self._columns.items()}

    def _check(self, where: Path) -> None:
        ids_off = self._columns["input_ids"][1]
        lengths = np.diff(ids_off)
        seq_values, seq_off = self._columns["seq_lens"]
        # per-row sum of seq_lens: cumulative sums read at the row boundaries
        seq_sums = np.diff(np.concatenate([[0], np.cumsum(seq_values)])[seq_off])
        bad = np.flatnonzero((seq_sums != lengths) | (np.diff(self._columns["labels"][1]) != lengths) | (lengths == 0))
        if len(bad):
            i = int(bad[0])
            raise PackedDataError(
                f"{where}: row {i} has {lengths[i]} input_ids, "
                f"{np.diff(self._columns['labels'][1])[i]} labels and seq_lens summing "
                f"to {seq_sums[i]}; they must be equal and non-zero ({len(bad)} bad rows)"
            )


def _flat(array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of an arrow list column: row i is values[offsets[i]:offsets[i+1]]."""
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return values, offsets - offsets[0]


def _first_tokens_unlabelled(labels: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    starts = np.cumsum(seq_lens) - seq_lens
    labels = labels.copy()
    labels[starts] = IGNORE
    return labels


def collate_padding_free(rows: list[dict]) -> dict:
    """Rows -> one row of shape (1, total_tokens) with position_ids restarting per sequence, no mask."""
    import torch

    seq_lens = np.concatenate([r["seq_lens"] for r in rows])
    input_ids = np.concatenate([r["input_ids"] for r in rows]).astype(np.int64)
    labels = _first_tokens_unlabelled(np.concatenate([r["labels"] for r in rows]).astype(np.int64), seq_lens)
    starts = np.cumsum(seq_lens) - seq_lens
    position_ids = np.arange(len(input_ids)) - np.repeat(starts, seq_lens)  # 0..n-1 within each sequence
    return {
        name: torch.from_numpy(a).unsqueeze(0)
        for name, a in (("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids))
    }


class PaddedCollator:
    """Rows -> (batch, longest) tensors, right-padded with `pad_id`; pad labels -100, mask 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), longest), IGNORE, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = r["input_ids"]
            labels[i, :n] = _first_tokens_unlabelled(r["labels"], r["seq_lens"])
            mask[i, :n] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
        }

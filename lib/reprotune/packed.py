"""data/packed, the tokenize stage's output: the one module that writes and reads it.

Layout
  manifest.json                 sequence_len, packed, columns, and per split: files, rows, sequences,
                                tokens, supervised_tokens
  <split>/part-00000.parquet    rows of input_ids, labels, position_ids, seq_lens (all list<int32>),
                                zstd, row groups of ROW_GROUP_ROWS rows, at most SHARD_ROWS rows a file
                                (a split with no rows has no files); splits are train and val
A row is one packed bin (or one sequence with packing off): its sequences back to back,
position_ids restarting at 0 for each, seq_lens their lengths; no sequence is split across rows.
labels are the input ids where loss is taken and IGNORE_INDEX elsewhere (unshifted, HF convention).

Readers
- `PackedRows`: a split as flat numpy columns plus row offsets (training), checked on load.
- `read_val_sequences`: validation sequences unpacked one by one (evaluation, merge verification).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reprotune.errors import BadInput
from reprotune.io import write_json

IGNORE_INDEX = -100  # label of a token that carries no loss (what torch's cross_entropy skips)
COLUMNS = ("input_ids", "labels", "position_ids", "seq_lens")
SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS])
ROW_GROUP_ROWS = 1000
SHARD_ROWS = 50_000
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# the manifest's per-split figures; the tokenize metrics hold more
SPLIT_SUMMARY = ("files", "rows", "sequences", "tokens", "supervised_tokens")


class PackedDataError(BadInput):
    """data/packed is missing or malformed."""


# ----------------------------------------------------------------------------- writing


def write_split(out_dir: Path, split: str, n_rows: int, row_group: Callable[[int, int], pa.Table]) -> list[str]:
    """Write rows [0, n_rows) of `split`, built by `row_group(r0, r1)` a row group at a time; returns
    the files written, relative to `out_dir`."""
    files = []
    for shard, s0 in enumerate(range(0, n_rows, SHARD_ROWS)):
        rel = f"{split}/part-{shard:05d}.parquet"
        (Path(out_dir) / split).mkdir(exist_ok=True)
        # token ids have no useful dictionary; zstd does the compressing
        with pq.ParquetWriter(Path(out_dir) / rel, SCHEMA, compression="zstd", use_dictionary=False) as writer:
            for g0 in range(s0, min(s0 + SHARD_ROWS, n_rows), ROW_GROUP_ROWS):
                g1 = min(g0 + ROW_GROUP_ROWS, s0 + SHARD_ROWS, n_rows)
                writer.write_table(row_group(g0, g1), row_group_size=ROW_GROUP_ROWS)
        files.append(rel)
    return files


def write_manifest(out_dir: Path, sequence_len: int, packed: bool, splits: dict[str, dict]) -> None:
    """manifest.json, with the SPLIT_SUMMARY figures of each split."""
    write_json(
        Path(out_dir) / MANIFEST,
        {
            "sequence_len": sequence_len,
            "packed": packed,
            "columns": list(COLUMNS),
            "splits": {name: {k: figures[k] for k in SPLIT_SUMMARY} for name, figures in splits.items()},
        },
    )


# ----------------------------------------------------------------------------- reading


def read_manifest(packed_dir: Path) -> dict:
    path = Path(packed_dir) / MANIFEST
    if not path.is_file():
        raise PackedDataError(f"{path} not found: run the tokenize stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def split_files(packed_dir: Path, split: str) -> list[Path]:
    return sorted((Path(packed_dir) / split).glob("part-*.parquet"))


class PackedRows:
    """Map-style dataset over one split; item i is a dict of int64 arrays (input_ids, labels, seq_lens).

    Held as flat numpy columns plus row offsets, so a multi-GB split costs one copy and no Python
    object per token. Rows are checked on load (sum(seq_lens) == len(input_ids) == len(labels) > 0);
    a bad row is bad input (exit 2). position_ids are not read: seq_lens is the one source of truth.
    """

    COLUMNS = ("input_ids", "labels", "seq_lens")

    def __init__(self, packed_dir: Path, split: str):
        files = split_files(packed_dir, split)
        if not files:
            raise PackedDataError(f"{Path(packed_dir) / split}: no part-*.parquet files; run the tokenize stage first")
        table = pa.concat_tables([pq.read_table(f, columns=list(self.COLUMNS)) for f in files])
        self._columns = {name: _flat(table.column(name).combine_chunks()) for name in self.COLUMNS}
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


@dataclass(frozen=True)
class ValSequence:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where the token is not supervised (unshifted)."""


def read_val_sequences(packed_dir: Path, limit: int) -> list[ValSequence]:
    """`limit` validation sequences evenly spaced over the split (all when fewer), unpacked, in
    split order; [] when there is no validation split. Evenly spaced, not the first `limit`:
    packing orders sequences by length, so the first ones would be the longest."""
    parts = split_files(packed_dir, "val")
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


def _unpack(table: pa.Table, keep: set[int]) -> list[ValSequence]:
    """Sequences number `keep` (counted across the table's rows) of a packed table."""
    out, k = [], 0
    for ids, labels, lens in zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels", "seq_lens"))):
        start = 0
        for n in lens:
            if k in keep:
                out.append(ValSequence(ids[start : start + n], labels[start : start + n]))
            start, k = start + n, k + 1
    return out

"""The tokenize stage's core: validated records -> masked, packed training rows in Parquet.

Outputs (in the folder given, which the stage swaps in atomically):
  train/part-00000.parquet ...  rows of input_ids, labels, position_ids, seq_lens (all list<int32>),
  val/part-00000.parquet ...    zstd, row groups of ROW_GROUP_ROWS rows, at most SHARD_ROWS rows a file
                                (a split with no rows has no files)
  manifest.json                 sequence_len, packed, columns, per split: files, rows, sequences,
                                tokens, supervised_tokens
A row is one packed bin (or one sequence with packing off): its sequences back to back,
position_ids restarting at 0 for each, seq_lens their lengths; no sequence is split across rows.

Features
- Streaming, bounded memory: records are read in batches of batch_size and tokenized (templates.py)
  by num_proc worker processes; at most 2 x num_proc batches are in flight. Tokenized sequences are
  spilled to two raw int32 files (ids, labels) beside the output and read back memory-mapped, so
  memory holds a few int arrays of one entry per sequence (length, record, trained count, offset:
  ~50 bytes a sequence with the split and packing indices), a batch per worker and the row group
  being written; never the tokens of the whole dataset.
- Same bytes for any num_proc and batch_size: batches are consumed in submission order and nothing
  depends on batch boundaries (tokenization is per record). Same bytes on every run: the split and
  shuffle come from numpy Generator(seed), packing is deterministic, Parquet is written with fixed
  settings and no timestamps.
- Train/val split at the record level (before tokenizing), so the chunks of a long document never
  straddle the split: val_set_size is a fraction (ceil(fraction x records)) or a whole count.
- Training rows are shuffled (seeded); validation rows keep packing order.
- Best-fit-decreasing packing (packing.py) into bins of sequence_len, for train and val alike.

Trade-offs
- Assembling rows gathers sequences in packing order from the memory-mapped spill: random reads,
  served by the page cache; beyond RAM this costs disk reads, never memory.
- Workers are forked (they inherit the loaded tokenizer; spawning would re-import transformers,
  seconds a worker), so num_proc > 1 needs a platform with fork (Linux, macOS). Each worker runs the
  Rust tokenizer on one thread (num_proc workers use num_proc cores); num_proc 1 tokenizes in this
  process with the tokenizer's own threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from reprotune.config.sections import TokenizeConfig
from reprotune.io import write_json
from reprotune.tokenize.packing import lower_bound_bins, pack_best_fit_decreasing
from reprotune.tokenize.templates import IGNORE_INDEX, PromptEncoder, TokenizeError

log = logging.getLogger(__name__)
COLUMNS = ("input_ids", "labels", "position_ids", "seq_lens")
SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS])
ROW_GROUP_ROWS = 1000
SHARD_ROWS = 50_000
RECORD_COLUMNS = ["source", "line", "type", "system", "instruction", "input", "output", "messages", "text"]
SPILL = ".spill"
COUNTS = ("dropped_too_long", "truncated", "dropped_no_trainable")


@dataclass
class Batch:
    """Tokenized sequences of one record batch, back to back."""

    input_ids: np.ndarray  # (tokens,) int32
    labels: np.ndarray  # (tokens,) int32, IGNORE_INDEX where no loss is taken
    lengths: np.ndarray  # (sequences,) int32
    record: np.ndarray  # (sequences,) int64, index of the sequence's record in the whole file
    trained: np.ndarray  # (sequences,) int32, labelled tokens per sequence
    counts: Counter


def encode_batch(encoder: PromptEncoder, start: int, records: list[dict]) -> Batch:
    """Tokenize records [start, start + len(records)) of the file into flat arrays."""
    enc = encoder.encode(records)
    seqs = enc.sequences
    lengths = np.fromiter((len(s.input_ids) for s in seqs), np.int64, len(seqs))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(s.input_ids for s in seqs), np.int32, total)
    # trained ranges -> (tokens,) mask: +1 at each range start, -1 at its end, running sum > 0
    offsets = (np.cumsum(lengths) - lengths).tolist()
    ranges = np.array([(o + a, o + b) for o, s in zip(offsets, seqs) for a, b in s.trained], dtype=np.int64).reshape(
        -1, 2
    )  # (ranges, 2) [start, end) in the batch's tokens
    edges = np.bincount(ranges[:, 0], minlength=total + 1) - np.bincount(ranges[:, 1], minlength=total + 1)
    mask = np.cumsum(edges[:total]) > 0
    return Batch(
        input_ids=ids,
        labels=np.where(mask, ids, IGNORE_INDEX).astype(np.int32),
        lengths=lengths.astype(np.int32),
        record=start + np.asarray(enc.record, dtype=np.int64),
        trained=np.fromiter((s.n_trained for s in seqs), np.int32, len(seqs)),
        counts=enc.counts,
    )


# ----------------------------------------------------------------------------- ordered workers

_WORKER_ENCODER: PromptEncoder | None = None


def _init_worker(encoder: PromptEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _work(task: tuple[int, list[dict]]) -> Batch:
    return encode_batch(_WORKER_ENCODER, *task)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def ordered_batches(encoder: PromptEncoder, tasks, num_proc: int) -> Iterator[Batch]:
    """encode_batch over `tasks`, results in task order, at most 2 x num_proc tasks in flight."""
    if num_proc == 1:
        yield from (encode_batch(encoder, *t) for t in tasks)
        return
    # Forked workers inherit this env: one Rust thread each, and no "forked after parallelism" warning.
    with _env("TOKENIZERS_PARALLELISM", "false"):
        pool = mp.get_context("fork").Pool(num_proc, _init_worker, (encoder,))
    with pool:
        pending: deque = deque()
        for task in tasks:  # Pool.imap would read the whole input ahead: no backpressure
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tasks(records_path: Path, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    """(index of the first record, records as dicts) per batch; workers never touch pyarrow."""
    start = 0
    for rb in pq.ParquetFile(records_path).iter_batches(batch_size=batch_size, columns=RECORD_COLUMNS):
        yield start, rb.to_pylist()
        start += rb.num_rows


# ----------------------------------------------------------------------------- spill


class Spill:
    """Tokenized sequences in two raw int32 files; per-sequence figures in memory."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder = folder
        self._files = [open(folder / "input_ids.i32", "wb"), open(folder / "labels.i32", "wb")]
        # lengths, record, trained: one array per batch, an empty one first so concatenate always works
        self._cols = ([np.zeros(0, np.int32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int32)])

    def add(self, batch: Batch) -> None:
        batch.input_ids.tofile(self._files[0])
        batch.labels.tofile(self._files[1])
        for col, part in zip(self._cols, (batch.lengths, batch.record, batch.trained)):
            col.append(part)

    def close(self) -> None:
        """Finish writing; then lengths, record, trained, offsets and the mapped tokens are readable."""
        for f in self._files:
            f.close()
        self.lengths, self.record, self.trained = (np.concatenate(c) for c in self._cols)  # (sequences,)
        self.offsets = np.cumsum(self.lengths, dtype=np.int64) - self.lengths  # (sequences,) in the files
        self.input_ids, self.labels = (self._map(n) for n in ("input_ids.i32", "labels.i32"))

    def _map(self, name: str) -> np.ndarray:
        path = self.folder / name
        # np.memmap refuses an empty file
        return np.memmap(path, dtype=np.int32, mode="r") if path.stat().st_size else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------- split, rows, writing


def split_records(n: int, val_set_size: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool, True for validation records: ceil(fraction x n) of them, or a whole count."""
    n_val = math.ceil(round(val_set_size * n, 9)) if val_set_size < 1 else int(val_set_size)
    if n_val and n_val >= n:
        raise TokenizeError(f"tokenize.val_set_size {val_set_size} leaves no training record out of {n}")
    in_val = np.zeros(n, dtype=bool)
    in_val[rng.permutation(n)[:n_val]] = True
    return in_val


@dataclass
class Rows:
    seqs: np.ndarray  # (sequences,) int64 spill indices, row after row
    bounds: np.ndarray  # (rows + 1,) int64: row r holds seqs[bounds[r]:bounds[r + 1]]

    @property
    def n(self) -> int:
        return len(self.bounds) - 1


def make_rows(idx: np.ndarray, lengths: np.ndarray, cfg: TokenizeConfig, rng) -> Rows:
    """Rows of the sequences `idx`: BFD bins (or one sequence each), shuffled when `rng` is given."""
    if cfg.sample_packing and idx.size:
        bins = pack_best_fit_decreasing(lengths[idx], cfg.sequence_len)
        seqs, sizes = idx[np.concatenate(bins)], np.array([b.size for b in bins], dtype=np.int64)
    else:
        seqs, sizes = idx, np.ones(idx.size, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    if rng is None:
        return Rows(seqs, bounds)
    order = rng.permutation(sizes.size)
    new_bounds = np.concatenate([[0], np.cumsum(sizes[order])])
    # element k of new row r comes from old position bounds[order[r]] + k
    gather = np.repeat(bounds[:-1][order] - new_bounds[:-1], sizes[order]) + np.arange(seqs.size)
    return Rows(seqs[gather], new_bounds)


def row_group(rows: Rows, r0: int, r1: int, spill: Spill) -> pa.Table:
    """Rows [r0, r1) as a table: sequences gathered from the spill, positions restarting per sequence."""
    b = rows.bounds[r0 : r1 + 1]
    seqs = rows.seqs[b[0] : b[-1]]
    lens = spill.lengths[seqs].astype(np.int64)  # (sequences,)
    ends = np.cumsum(lens)
    starts = ends - lens  # where each sequence starts in this group's flat arrays
    total = int(ends[-1]) if ends.size else 0
    gather = np.repeat(spill.offsets[seqs] - starts, lens) + np.arange(total)  # (tokens,) spill index
    positions = np.arange(total) - np.repeat(starts, lens)
    tok_bounds = np.concatenate([[0], ends])[b - b[0]].astype(np.int32)  # (rows + 1,) token offsets
    seq_bounds = (b - b[0]).astype(np.int32)  # (rows + 1,) sequence offsets
    arrays = [spill.input_ids[gather], spill.labels[gather], positions.astype(np.int32)]
    columns = [pa.ListArray.from_arrays(tok_bounds, pa.array(a, pa.int32())) for a in arrays]
    columns.append(pa.ListArray.from_arrays(seq_bounds, pa.array(lens.astype(np.int32))))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def write_split(
    out_dir: Path, name: str, idx: np.ndarray, n_records: int, spill: Spill, cfg: TokenizeConfig, rng
) -> dict:
    """Pack (cfg.sample_packing) and write the sequences `idx` in shards; returns the split's figures."""
    rows = make_rows(idx, spill.lengths, cfg, rng)
    files = []
    for shard, s0 in enumerate(range(0, rows.n, SHARD_ROWS)):
        rel = f"{name}/part-{shard:05d}.parquet"
        (out_dir / name).mkdir(exist_ok=True)
        # token ids have no useful dictionary; zstd does the compressing
        with pq.ParquetWriter(out_dir / rel, SCHEMA, compression="zstd", use_dictionary=False) as writer:
            for g0 in range(s0, min(s0 + SHARD_ROWS, rows.n), ROW_GROUP_ROWS):
                g1 = min(g0 + ROW_GROUP_ROWS, s0 + SHARD_ROWS, rows.n)
                writer.write_table(row_group(rows, g0, g1, spill), row_group_size=ROW_GROUP_ROWS)
        files.append(rel)
    tokens = int(spill.lengths[idx].sum(dtype=np.int64))
    log.info("%s: %d records -> %d sequences -> %d rows", name, n_records, idx.size, rows.n)
    return {
        "files": files,
        "records": n_records,
        "sequences": int(idx.size),
        "tokens": tokens,
        "supervised_tokens": int(spill.trained[idx].sum(dtype=np.int64)),
        "rows": rows.n,
        "lower_bound_bins": lower_bound_bins(tokens, cfg.sequence_len),
        "packing_efficiency": tokens / (rows.n * cfg.sequence_len) if rows.n else 0.0,
    }


# ----------------------------------------------------------------------------- the stage core


def tokenize_dataset(records_path, tokenizer, cfg: TokenizeConfig, out_dir) -> dict:
    """Tokenize, mask, split, pack and write `records_path` into `out_dir`; returns the metrics."""
    t0 = time.perf_counter()
    records_path, out_dir = Path(records_path), Path(out_dir)
    encoder = PromptEncoder(tokenizer, cfg)
    n_records = pq.ParquetFile(records_path).metadata.num_rows
    rng = np.random.default_rng(cfg.seed)
    in_val = split_records(n_records, cfg.val_set_size, rng)  # (records,) bool
    n_val = int(in_val.sum())
    spill = Spill(out_dir / SPILL)
    try:
        counts = Counter()
        batches = ordered_batches(encoder, _tasks(records_path, cfg.batch_size), cfg.num_proc)
        for batch in tqdm(batches, desc="tokenize", unit="batch", mininterval=2):
            spill.add(batch)
            counts.update(batch.counts)
        spill.close()
        seq_val = in_val[spill.record]  # (sequences,) bool
        if seq_val.all():
            raise TokenizeError(
                f"no training sequence left out of {n_records} records "
                f"({', '.join(f'{k} {counts[k]}' for k in COUNTS)})"
            )
        splits = {
            "train": write_split(out_dir, "train", np.flatnonzero(~seq_val), n_records - n_val, spill, cfg, rng),
            "val": write_split(out_dir, "val", np.flatnonzero(seq_val), n_val, spill, cfg, None),
        }
    finally:
        shutil.rmtree(out_dir / SPILL, ignore_errors=True)
    summary = ("files", "rows", "sequences", "tokens", "supervised_tokens")
    write_json(
        out_dir / "manifest.json",
        {
            "sequence_len": cfg.sequence_len,
            "packed": cfg.sample_packing,
            "columns": list(COLUMNS),
            "splits": {name: {k: fig[k] for k in summary} for name, fig in splits.items()},
        },
    )
    return _metrics(n_records, splits, counts, cfg.sequence_len, time.perf_counter() - t0)


def _metrics(n_records: int, splits: dict, counts: Counter, sequence_len: int, seconds: float) -> dict:
    total = {k: sum(s[k] for s in splits.values()) for k in ("sequences", "tokens", "supervised_tokens", "rows")}
    return {
        "records": n_records,
        **{k: total[k] for k in ("sequences", "tokens", "supervised_tokens")},
        "bins": total["rows"],
        "lower_bound_bins": lower_bound_bins(total["tokens"], sequence_len),
        "packing_efficiency": total["tokens"] / (total["rows"] * sequence_len) if total["rows"] else 0.0,
        **{k: counts[k] for k in COUNTS},
        "splits": {name: {k: v for k, v in fig.items() if k != "files"} for name, fig in splits.items()},
        "seconds": round(seconds, 3),
    }

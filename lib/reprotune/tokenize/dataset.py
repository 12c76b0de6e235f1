"""The tokenize stage's core: validated records -> masked, packed training rows in Parquet.

Output (in the folder given, which the stage swaps in atomically): the data/packed layout of
reprotune.packed, train and val splits plus manifest.json.

Features
- Streaming, bounded memory: records are read in batches of batch_size and tokenized (templates.py)
  by num_proc worker processes; at most 2 x num_proc batches are in flight. Tokenized sequences are
  spilled to two raw int32 files (ids, labels) beside the output and read back a row group at a time
  with positioned reads, so memory holds a few int arrays of one entry per sequence (length, record,
  trained count, offset: ~50 bytes a sequence with the split and packing indices), a batch per worker
  and the row group being written; never the tokens of the whole dataset. benchmarks/
  bench_tokenize_memory.py (generated alpaca records of ~110 tokens, sequence_len 2048, 2-core VM): peak
  resident set 541 MB at 20,000 records, 568 MB at 200,000, 614 MB at 2,000,000.
- Same bytes for any num_proc and batch_size: batches are consumed in submission order and nothing
  depends on batch boundaries (tokenization is per record). Same bytes on every run: the split and
  shuffle come from numpy Generator(seed), packing is deterministic, Parquet is written with fixed
  settings and no timestamps.
- Train/val split at the record level (before tokenizing), so the chunks of a long document never
  straddle the split: val_set_size is a fraction (ceil(fraction x records)) or a whole count; or, with
  data.test_datasets, exactly their records.
- Dataset weights act on the training records after the split (a copy never lands in validation):
  weight w gives each record floor(w) copies plus one more for round(frac(w) x n) of them, drawn with a
  generator seeded by (seed, dataset index), so the split is drawn as without weights.
- Replay (data/replay, the replay stage's records of the base's own answers) is mixed into training only,
  after the split and the weights: round(w / (1 - w) x the data's training copies) replay copies in all
  (w = data.replay.weight, so replay is w of the training copies), spread over its records as a dataset
  weight is. The validation split and every data record's copies are those of a run without replay. A
  self-distillation replay of a validation record is left out; an answer cut at max_new_tokens is trained
  without its end-of-turn token.
- Training rows are shuffled (seeded); validation rows keep packing order.
- Best-fit-decreasing packing (packing.py) into bins of sequence_len, for train and val alike.

Trade-offs
- Assembling rows reads sequences in row order from the spill: a read call per sequence and file (Python
  overhead ~1 us each), served by the page cache; beyond RAM this costs disk reads, never memory.
- Workers are forked (they inherit the loaded tokenizer; spawning would re-import transformers,
  seconds a worker), so num_proc > 1 needs a platform with fork (Linux, macOS). Each worker runs the
  Rust tokenizer on one thread (num_proc workers use num_proc cores); num_proc 1 tokenizes in this
  process with the tokenizer's own threads.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import shutil
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from reprotune import packed
from reprotune.config import Params
from reprotune.config.sections import TokenizeConfig
from reprotune.io import temporary_env
from reprotune.layout import BASE, REPLAY, VALIDATED
from reprotune.packed import IGNORE_INDEX
from reprotune.records import (
    DATASETS,
    RECORDS,
    REPLAY_CUT,
    SELF_SOURCE,
    DatasetEntry,
    iter_record_batches,
    read_datasets,
    record_datasets,
)
from reprotune.tokenize.packing import lower_bound_bins, pack_best_fit_decreasing_flat, packing_efficiency
from reprotune.tokenize.templates import ChatMasking, PromptEncoder, TokenizeError

log = logging.getLogger(__name__)
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


def ordered_batches(encoder: PromptEncoder, tasks, num_proc: int) -> Iterator[Batch]:
    """encode_batch over `tasks`, results in task order, at most 2 x num_proc tasks in flight."""
    if num_proc == 1:
        yield from (encode_batch(encoder, *t) for t in tasks)
        return
    # Forked workers inherit this env: one Rust thread each, and no "forked after parallelism" warning.
    with temporary_env({"TOKENIZERS_PARALLELISM": "false"}):
        pool = mp.get_context("fork").Pool(num_proc, _init_worker, (encoder,))
    with pool:
        pending: deque = deque()
        for task in tasks:  # Pool.imap would read the whole input ahead: no backpressure
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- spill


class Spill:
    """Tokenized sequences in two raw int32 files; per-sequence figures in memory."""

    FILES = ("input_ids.i32", "labels.i32")

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder = folder
        self._files = [open(folder / name, "wb") for name in self.FILES]
        self._readers: list = []  # opened by close()
        # lengths, record, trained, grown in place: a list of small per-batch arrays would pin pages all over
        # the heap between the batches' Python objects, memory that grows with the data and is never returned
        self._cols = tuple(_Growing(np.int32) for _ in range(3))

    def add(self, batch: Batch) -> None:
        batch.input_ids.tofile(self._files[0])
        batch.labels.tofile(self._files[1])
        for col, part in zip(self._cols, (batch.lengths, batch.record, batch.trained)):
            col.extend(part)

    def close(self) -> None:
        """Finish writing; then lengths, record, trained, offsets and `read` are available."""
        for f in self._files:
            f.close()
        self.lengths, self.record, self.trained = (c.array() for c in self._cols)  # (sequences,) int32
        self._cols = None
        self.offsets = np.cumsum(self.lengths, dtype=np.int64) - self.lengths  # (sequences,) in the files
        self._readers = [open(self.folder / name, "rb", buffering=0) for name in self.FILES]

    def read(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens,) input ids and labels of the sequences `seqs`, one after another: a positioned read per
        sequence and file. Not through a memory map: mapped pages a read touches stay in this process's
        resident set (with the kernel's fault-around, far more than the bytes read), so shuffled rows would
        make the whole spill resident as the data grows; read pages stay in the page cache only."""
        lens = (self.lengths[seqs].astype(np.int64) * 4).tolist()  # bytes
        starts = (self.offsets[seqs] * 4).tolist()
        total = sum(lens)
        out = []
        for f in self._readers:
            buffer = np.empty(total // 4, np.int32)
            view, at = memoryview(buffer).cast("B"), 0
            for start, size in zip(starts, lens):
                if os.preadv(f.fileno(), [view[at : at + size]], start) != size:
                    raise OSError(f"{f.name}: short read at byte {start}")
                at += size
            out.append(buffer)
        return out[0], out[1]

    def finish(self) -> None:
        for f in self._readers:
            f.close()


class _Growing:
    """An int array appended to in place, its capacity doubled when full (one large block, not many small ones)."""

    def __init__(self, dtype):
        self._data, self._n = np.empty(1 << 16, dtype), 0

    def extend(self, part: np.ndarray) -> None:
        if self._n + part.size > self._data.size:
            grown = np.empty(max(2 * self._data.size, self._n + part.size), self._data.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : self._n + part.size] = part
        self._n += part.size

    def array(self) -> np.ndarray:
        """The values, trimmed (a copy: the spare capacity goes with the buffer)."""
        return self._data[: self._n].copy()


# ----------------------------------------------------------------------------- split, rows, writing


def split_records(n: int, val_set_size: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool, True for validation records: ceil(fraction x n) of them, or a whole count."""
    n_val = math.ceil(round(val_set_size * n, 9)) if val_set_size < 1 else int(val_set_size)
    if n_val and n_val >= n:
        raise TokenizeError(f"tokenize.val_set_size {val_set_size} leaves no training record out of {n}")
    in_val = np.zeros(n, dtype=bool)
    in_val[rng.permutation(n)[:n_val]] = True
    return in_val


def record_copies(dataset: np.ndarray, in_val: np.ndarray, entries: list[DatasetEntry], seed: int) -> np.ndarray:
    """(records,) int64 training copies of each record: 0 in validation, else by its dataset's weight."""
    copies = (~in_val).astype(np.int64)
    for index, entry in enumerate(entries):
        if entry.weight == 1:
            continue
        train = np.flatnonzero((dataset == index) & ~in_val)  # (n,) this dataset's training records
        # exact decimal arithmetic: 1.1 is 11/10 here, not 1.1000000000000000888 (whose fraction part would
        # round 5 x 0.1 up)
        copies[train] = weighted_copies(train.size, Fraction(str(entry.weight)), [seed, index])
        if train.size and not copies[train].any():
            log.warning("%s: weight %s leaves none of its %d training records", entry.path, entry.weight, train.size)
    return copies


def weighted_copies(n: int, weight: Fraction, key: list[int]) -> np.ndarray:
    """(n,) int64: floor(weight) copies of each of n records, plus one more for round-half-up(frac(weight) x n)
    of them, drawn with a generator seeded by `key`."""
    whole, fraction = divmod(weight, 1)
    extra = math.floor(fraction * n + Fraction(1, 2))
    copies = np.full(n, int(whole), dtype=np.int64)
    copies[np.random.default_rng(key).permutation(n)[:extra]] += 1
    return copies


def replay_copies(keep: np.ndarray, task_copies: int, share: float, key: list[int]) -> np.ndarray:
    """(replay records,) int64 training copies: round(share / (1 - share) x task_copies) in all, so replay is
    `share` of the training records' copies, spread over the records `keep` marks as a dataset weight is
    (drawn with `key`); none for the others (replays of validation prompts)."""
    copies = np.zeros(keep.size, dtype=np.int64)
    if not keep.any():
        return copies
    w = Fraction(str(share))
    total = math.floor(w / (1 - w) * task_copies + Fraction(1, 2))
    copies[keep] = weighted_copies(int(keep.sum()), Fraction(total, int(keep.sum())), key)
    return copies


def weight_figures(dataset: np.ndarray, in_val: np.ndarray, copies: np.ndarray, entries: list[DatasetEntry]) -> dict:
    """Per weighted dataset, by path (a path listed twice, e.g. two shards of one file, also names the
    entry's index in datasets.json): its weight, training records before weighting, and after (copies)."""
    listed = Counter(e.path for e in entries)
    return {
        entry.path if listed[entry.path] == 1 else f"{entry.path} [{index}]": {
            "weight": entry.weight,
            "train_records": int(((dataset == index) & ~in_val).sum()),
            "train_copies": int(copies[dataset == index].sum()),
        }
        for index, entry in enumerate(entries)
        if entry.weight != 1
    }


@dataclass
class Rows:
    """Packed bins and the order they are written in, without a per-sequence copy for the shuffle."""

    seqs: np.ndarray  # (sequences,) int64 spill indices, bin after bin
    bounds: np.ndarray  # (bins + 1,) int64: bin k holds seqs[bounds[k]:bounds[k + 1]]
    order: np.ndarray | None  # (bins,) row r is bin order[r] (shuffled); None: row r is bin r

    @property
    def n(self) -> int:
        return len(self.bounds) - 1

    def group(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [r0, r1): (sequences,) their spill indices, row after row, and (rows + 1,) offsets into them."""
        bins = self.order[r0:r1] if self.order is not None else np.arange(r0, r1)
        starts, ends = self.bounds[bins], self.bounds[bins + 1]
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        if self.order is None:
            return self.seqs[starts[0] : ends[-1]], offsets
        return np.concatenate([self.seqs[a:b] for a, b in zip(starts.tolist(), ends.tolist())]), offsets


def make_rows(idx: np.ndarray, lengths: np.ndarray, cfg: TokenizeConfig, rng) -> Rows:
    """Rows of the sequences `idx`: BFD bins (or one sequence each), shuffled when `rng` is given."""
    if cfg.sample_packing and idx.size:
        items, bounds = pack_best_fit_decreasing_flat(lengths[idx], cfg.sequence_len)
        seqs = idx[items]
    else:
        seqs, bounds = idx, np.arange(idx.size + 1, dtype=np.int64)
    return Rows(seqs, bounds, rng.permutation(len(bounds) - 1) if rng is not None else None)


def row_group(rows: Rows, r0: int, r1: int, spill: Spill) -> pa.Table:
    """Rows [r0, r1) as a table: sequences gathered from the spill, positions restarting per sequence."""
    seqs, b = rows.group(r0, r1)  # b: (rows + 1,) sequence offsets
    lens = spill.lengths[seqs].astype(np.int64)  # (sequences,)
    ends = np.cumsum(lens)
    starts = ends - lens  # where each sequence starts in this group's flat arrays
    total = int(ends[-1]) if ends.size else 0
    positions = np.arange(total) - np.repeat(starts, lens)
    tok_bounds = np.concatenate([[0], ends])[b].astype(np.int32)  # (rows + 1,) token offsets
    seq_bounds = b.astype(np.int32)  # (rows + 1,) sequence offsets
    arrays = [*spill.read(seqs), positions.astype(np.int32)]
    columns = [pa.ListArray.from_arrays(tok_bounds, pa.array(a, pa.int32())) for a in arrays]
    columns.append(pa.ListArray.from_arrays(seq_bounds, pa.array(lens.astype(np.int32))))
    return pa.Table.from_arrays(columns, schema=packed.SCHEMA)


def write_split(
    out_dir: Path, name: str, idx: np.ndarray, n_records: int, spill: Spill, cfg: TokenizeConfig, rng
) -> dict:
    """Pack (cfg.sample_packing) and write the sequences `idx`; returns the split's figures."""
    rows = make_rows(idx, spill.lengths, cfg, rng)
    files = packed.write_split(out_dir, name, rows.n, lambda r0, r1: row_group(rows, r0, r1, spill))
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
        "packing_efficiency": packing_efficiency(tokens, rows.n, cfg.sequence_len),
    }


# ----------------------------------------------------------------------------- the stage core


@dataclass(frozen=True)
class ReplayRecords:
    """The replay stage's records (reprotune.replay): trained after the data's, never validated."""

    path: Path
    n: int
    of_training: np.ndarray  # (n,) bool: the prompt is a training record's (self-distillation)
    row: np.ndarray  # (n,) int64: that record's row in records.parquet (from 0), else -1

    def of_validation(self, in_val: np.ndarray) -> np.ndarray:
        """(n,) bool: self-distillation replays of the records `in_val` (records,) marks as validation."""
        return self.of_training & in_val[np.maximum(self.row, 0)]

    @classmethod
    def read(cls, path: Path) -> ReplayRecords:
        table = pq.read_table(path, columns=["source", "line"])
        of_training = np.array([s == SELF_SOURCE for s in table.column("source").to_pylist()], dtype=bool)
        row = np.where(of_training, table.column("line").to_numpy() - 1, -1).astype(np.int64)
        return cls(Path(path), table.num_rows, of_training, row)


@dataclass(frozen=True)
class TokenizeInputs:
    records: Path = VALIDATED / RECORDS
    datasets: Path = VALIDATED / DATASETS
    replay: Path = REPLAY / RECORDS
    """The base's own answers (the replay stage); absent or empty: no replay."""
    base: Path = BASE
    """The base model folder: its tokenizer and chat template."""


def tokenize(params: Params, inputs: TokenizeInputs, out_dir: Path) -> dict:
    """The stage core: the base's tokenizer over the validated records; returns the metrics."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs.base, trust_remote_code=params.base.trust_remote_code)
    replay = ReplayRecords.read(inputs.replay) if inputs.replay.is_file() else None
    return tokenize_dataset(
        inputs.records, tokenizer, params.tokenize, out_dir, read_datasets(inputs.datasets),
        replay=replay if replay and replay.n else None, replay_weight=params.data.replay.weight,
    )  # fmt: skip


def tokenize_dataset(
    records_path,
    tokenizer,
    cfg: TokenizeConfig,
    out_dir,
    datasets: list[DatasetEntry] = (),
    replay: ReplayRecords | None = None,
    replay_weight: float = 0.0,
) -> dict:
    """Tokenize, mask, split, pack and write `records_path` into `out_dir`; returns the metrics.

    `datasets`: the entries the records' `dataset` indexes point at (test sets, weights, chat masking);
    an index without an entry is a plain dataset. `replay`: records trained after those, `replay_weight`
    of the training sequences' records; the split and every data record's copies are as without them."""
    records_path, out_dir = Path(records_path), Path(out_dir)
    masking = chat_masking(datasets, cfg)
    if replay is not None:  # a replay answer cut at max_new_tokens: its text trained, its end of turn not
        masking[len(datasets) + REPLAY_CUT] = ChatMasking(frozenset(cfg.roles_to_train), "none")
    encoder = PromptEncoder(tokenizer, cfg, masking)
    dataset = record_datasets(records_path)  # (records,) int32
    n_records = dataset.size
    if datasets and dataset.size and dataset.max() >= len(datasets):
        raise TokenizeError(
            f"records name dataset {dataset.max()}; datasets.json lists {len(datasets)}: rerun validate"
        )
    rng = np.random.default_rng(cfg.seed)
    tests = [i for i, e in enumerate(datasets) if e.test]
    # (records,) bool; an explicit validation set replaces the drawn one (check: val_set_size is 0 then)
    in_val = np.isin(dataset, tests) if tests else split_records(n_records, cfg.val_set_size, rng)
    copies = record_copies(dataset, in_val, datasets, cfg.seed)  # (records,) int64 training copies
    n_val = int(in_val.sum())
    tasks = iter_record_batches(records_path, cfg.batch_size)
    if replay is not None:  # replay records follow the data's: indexes n_records.., never in validation
        if replay.row.max() >= n_records:
            raise TokenizeError(f"{replay.path} replays record rows beyond {records_path}'s {n_records}: rerun replay")
        left_out = replay.of_validation(in_val)  # (replay records,) bool
        more = replay_copies(~left_out, int(copies.sum()), replay_weight, [cfg.seed, len(datasets)])
        replay_figures = {
            "records": replay.n,
            "left_out_validation": int(left_out.sum()),
            "weight": replay_weight,
            "train_copies": int(more.sum()),
        }
        copies, in_val = np.concatenate([copies, more]), np.concatenate([in_val, np.zeros(replay.n, bool)])
        tasks = chain(tasks, replay_batches(replay.path, n_records, len(datasets), cfg.batch_size))
    spill = Spill(out_dir / SPILL)
    try:
        counts = Counter()
        batches = ordered_batches(encoder, tasks, cfg.num_proc)
        for batch in tqdm(batches, desc="tokenize", unit="batch", mininterval=2):
            spill.add(batch)
            counts.update(batch.counts)
        spill.close()
        seq_val = in_val[spill.record]  # (sequences,) bool
        # weighted copies, in order; int32 like the spill's figures (4 bytes a sequence less, 2^31 sequences)
        train_seqs = np.repeat(np.arange(seq_val.size, dtype=np.int32), copies[spill.record])
        if not train_seqs.size:
            raise TokenizeError(
                f"no training sequence left out of {n_records} records "
                f"({', '.join(f'{k} {counts[k]}' for k in COUNTS)})"
            )
        splits = {
            "train": write_split(out_dir, "train", train_seqs, n_records - n_val, spill, cfg, rng),
            "val": write_split(out_dir, "val", np.flatnonzero(seq_val), n_val, spill, cfg, None),
        }
        if replay is not None:  # replay's share of what training learns from: its supervised tokens
            replayed = train_seqs[spill.record[train_seqs] >= n_records]
            replay_figures["train_supervised_tokens"] = int(spill.trained[replayed].sum(dtype=np.int64))
    finally:
        spill.finish()
        shutil.rmtree(out_dir / SPILL, ignore_errors=True)
    packed.write_manifest(out_dir, cfg.sequence_len, cfg.sample_packing, splits)
    metrics = _metrics(n_records, splits, counts, cfg.sequence_len)
    weights = weight_figures(dataset, in_val[:n_records], copies[:n_records], datasets)
    metrics = {**metrics, "weights": weights} if weights else metrics
    return {**metrics, "replay": replay_figures} if replay is not None else metrics


def replay_batches(path: Path, start: int, offset: int, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    """The replay records as tokenizer tasks: indexes from `start`, dataset indexes moved past the data's by
    `offset` (0, an ended answer: tokenize's own chat masking; REPLAY_CUT: see tokenize_dataset)."""
    for first, batch in iter_record_batches(path, batch_size):
        yield start + first, [{**r, "dataset": offset + r["dataset"]} for r in batch]


def chat_masking(datasets: list[DatasetEntry], cfg: TokenizeConfig) -> dict[int, ChatMasking]:
    """The datasets whose roles_to_train or train_on_eos override tokenize's."""
    return {
        index: ChatMasking(frozenset(e.roles_to_train or cfg.roles_to_train), e.train_on_eos or cfg.train_on_eos)
        for index, e in enumerate(datasets)
        if e.roles_to_train is not None or e.train_on_eos is not None
    }


def _metrics(n_records: int, splits: dict, counts: Counter, sequence_len: int) -> dict:
    total = {k: sum(s[k] for s in splits.values()) for k in ("sequences", "tokens", "supervised_tokens", "rows")}
    return {
        "records": n_records,
        **{k: total[k] for k in ("sequences", "tokens", "supervised_tokens")},
        "bins": total["rows"],
        "lower_bound_bins": lower_bound_bins(total["tokens"], sequence_len),
        "packing_efficiency": packing_efficiency(total["tokens"], total["rows"], sequence_len),
        **{k: counts[k] for k in COUNTS},
        "splits": {name: {k: v for k, v in fig.items() if k != "files"} for name, fig in splits.items()},
    }

"""Helpers for tests and benchmarks only: no stage imports this module.

- Synthetic alpaca-like token data in the data/packed layout. Each sequence is a prompt (labels
  IGNORE_INDEX) followed by a response (labels = ids), with long-tailed lognormal lengths like
  instruction data: by default mean 200 tokens and sigma 1.0 (the distribution
  benchmarks/bench_packing.py uses), clipped to [8, max_len]. Token ids are random, so the loss stays
  near ln(vocab): these rows measure mechanics and speed, not learning. The same sequences can be
  written packed or one per row, so the two batch layouts can be compared on identical tokens.
- `pack_first_fit`: plain first-fit in a given order, the baseline the best-fit-decreasing packer is
  measured against (Axolotl packs first-fit over a shuffled order). A max segment tree over the
  bins' free room finds "first bin that fits" in O(log bins) Python steps per item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from reprotune import packed as packed_data
from reprotune.packed import IGNORE_INDEX
from reprotune.tokenize.packing import (
    as_lengths,
    check_capacity,
    group_bins,
    lower_bound_bins,
    pack_best_fit_decreasing,
)

FIRST_ID = 5  # ids 0..4 are the built-in tokenizer's specials


def sequences(n: int, seed: int, vocab: int, max_len: int, mean_len: float = 200.0, sigma: float = 1.0) -> list[tuple]:
    """`n` (input_ids, labels) pairs of int32 arrays, lengths in [8, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(mean_len) - sigma**2 / 2, sigma, n)), 8, max_len)
    out = []
    for length in lengths.astype(int):
        ids = rng.integers(FIRST_ID, vocab, length, dtype=np.int32)
        labels = ids.copy()
        labels[: int(length * rng.uniform(0.3, 0.6))] = IGNORE_INDEX  # the prompt part
        out.append((ids, labels))
    return out


def write_packed_dir(out_dir: Path, splits: dict[str, list[tuple]], sequence_len: int, packed: bool) -> None:
    """A complete data/packed folder of these splits: packed (best-fit-decreasing bins, as the tokenize
    stage does) or one sequence per row."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {name: _write_split(out_dir, name, seqs, sequence_len, packed) for name, seqs in splits.items()}
    packed_data.write_manifest(out_dir, sequence_len, packed, figures)


def _write_split(out_dir: Path, split: str, seqs: list[tuple], sequence_len: int, packed: bool) -> dict:
    lengths = np.array([len(ids) for ids, _ in seqs])
    bins = pack_best_fit_decreasing(lengths, sequence_len) if packed else [[i] for i in range(len(seqs))]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for members in bins:
        rows["input_ids"].append(np.concatenate([seqs[i][0] for i in members]))
        rows["labels"].append(np.concatenate([seqs[i][1] for i in members]))
        rows["position_ids"].append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in members]))
        rows["seq_lens"].append(lengths[list(members)].astype(np.int32))
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in rows.items()}, schema=packed_data.SCHEMA)
    files = packed_data.write_split(out_dir, split, len(bins), lambda r0, r1: table.slice(r0, r1 - r0))
    supervised = sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in seqs)
    return {
        "files": files,
        "rows": len(bins),
        "sequences": len(seqs),
        "tokens": int(lengths.sum()),
        "supervised_tokens": supervised,
    }


def _as_order(order, n: int) -> np.ndarray:
    """Validate that `order` is a permutation of range(n)."""
    arr = np.asarray(order)
    if arr.shape != (n,) or (n and arr.dtype.kind not in "iu"):
        raise ValueError(f"order must be a 1-D int array of length {n}")
    arr = arr.astype(np.int64, copy=False)
    if n and (arr.min() < 0 or arr.max() >= n or np.bincount(arr, minlength=n).max() != 1):
        raise ValueError("order must be a permutation of range(len(lengths))")
    return arr


def pack_first_fit(lengths, capacity: int, order=None) -> list[np.ndarray]:
    """First-fit packing: each item (in `order`, default index order) goes into the first opened
    bin that still fits it, else a new bin. Returns bins in open order, items in placement order.

    Leaves of a max segment tree hold every bin's free room; not-yet-opened bins start with the
    full capacity, so "leftmost leaf >= L" is either the first open bin that fits or the next new
    bin, with no special case.
    """
    capacity = check_capacity(capacity)
    lengths = as_lengths(lengths, capacity)
    n = lengths.size
    if n == 0:
        return []
    order = np.arange(n, dtype=np.int64) if order is None else _as_order(order, n)
    # first-fit never leaves two bins at most half full (the later one's items would have fit
    # the earlier one), so it opens at most ceil(2 * total / capacity) + 1 bins
    max_bins = min(n, lower_bound_bins(2 * int(lengths.sum()), capacity) + 1)
    size = 1 << max(0, (max_bins - 1).bit_length())
    tree = [capacity] * (2 * size)  # tree[1] is the root, leaves at [size, 2 * size)
    bin_of = [0] * n
    n_bins = 0
    for k, L in enumerate(lengths[order].tolist()):
        i = 1
        while i < size:  # descend to the leftmost leaf with room >= L
            i <<= 1
            if tree[i] < L:
                i += 1
        b = i - size
        bin_of[k] = b
        if b >= n_bins:
            n_bins = b + 1
        tree[i] -= L
        while i > 1:  # refresh maxima upward; stop as soon as one is unchanged
            i >>= 1
            a, c = tree[2 * i], tree[2 * i + 1]
            m = a if a > c else c
            if tree[i] == m:
                break
            tree[i] = m
    return group_bins(order, np.asarray(bin_of, dtype=np.int64), n_bins)

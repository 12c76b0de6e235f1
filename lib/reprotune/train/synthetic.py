"""Synthetic alpaca-like token data in the data/packed layout, for tests and benchmarks.

Each sequence is a prompt (labels -100) followed by a response (labels = ids), with long-tailed
lognormal lengths like instruction data: by default mean 200 tokens and sigma 1.0, the
distribution benchmarks/bench_packing.py uses, clipped to [8, max_len]. Token ids are random, so the
loss stays near ln(vocab); these rows measure mechanics and speed, not learning. The same
sequences can be written packed (best-fit-decreasing bins, as the tokenize stage does) or one
per row, so the two batch layouts can be compared on identical tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reprotune.io import write_json
from reprotune.tokenize.packing import pack_best_fit_decreasing

IGNORE = -100
FIRST_ID = 5  # ids 0..4 are the built-in tokenizer's specials


def sequences(n: int, seed: int, vocab: int, max_len: int, mean_len: float = 200.0, sigma: float = 1.0) -> list[tuple]:
    """`n` (input_ids, labels) pairs of int32 arrays, lengths in [8, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(mean_len) - sigma**2 / 2, sigma, n)), 8, max_len)
    out = []
    for length in lengths.astype(int):
        ids = rng.integers(FIRST_ID, vocab, length, dtype=np.int32)
        labels = ids.copy()
        labels[: int(length * rng.uniform(0.3, 0.6))] = IGNORE  # the prompt part
        out.append((ids, labels))
    return out


def write_split(out_dir: Path, split: str, seqs: list[tuple], sequence_len: int, packed: bool) -> dict:
    """Write `<out_dir>/<split>/part-00000.parquet`; returns the split's manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = np.array([len(ids) for ids, _ in seqs])
    bins = pack_best_fit_decreasing(lengths, sequence_len) if packed else [[i] for i in range(len(seqs))]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for members in bins:
        rows["input_ids"].append(np.concatenate([seqs[i][0] for i in members]))
        rows["labels"].append(np.concatenate([seqs[i][1] for i in members]))
        rows["position_ids"].append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in members]))
        rows["seq_lens"].append(lengths[list(members)].astype(np.int32))
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in rows.items()})
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / split / "part-00000.parquet")
    return {"rows": len(bins), "sequences": len(seqs), "tokens": int(lengths.sum())}


def write_packed_dir(out_dir: Path, splits: dict[str, list[tuple]], sequence_len: int, packed: bool) -> None:
    """A complete data/packed folder: one parquet part per split plus manifest.json."""
    out_dir = Path(out_dir)
    entries = {name: write_split(out_dir, name, seqs, sequence_len, packed) for name, seqs in splits.items()}
    write_json(out_dir / "manifest.json", {"sequence_len": sequence_len, "packed": packed, "splits": entries})

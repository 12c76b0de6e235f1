"""Benchmark the sequence packer: BFD (ours) vs first-fit over a random order (the peers' baseline).

Synthetic long-tailed lengths: a lognormal (mean ~200 tokens) rounded and clipped to [8, 2048],
fixed seed. Prints efficiency, bins, the lower bound and times; `run()` returns the same figures.

    python benchmarks/bench_packing.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import numpy as np

from reprotune.testing import pack_first_fit
from reprotune.tokenize.packing import lower_bound_bins, pack_best_fit_decreasing, packing_efficiency

TARGET_EFFICIENCY = 0.995
TARGET_LARGE_S = 2.0


def synthetic_lengths(n: int, seed: int, capacity: int = 2048, mean: float = 200.0) -> np.ndarray:
    """Long-tailed lengths: lognormal(sigma=1) with the given mean, clipped to [8, capacity]."""
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    raw = np.random.default_rng(seed).lognormal(mu, sigma, n)
    return np.clip(np.rint(raw), 8, capacity).astype(np.int64)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run(n_small: int = 20000, n_large: int = 1_000_000, capacity: int = 2048, seed: int = 0) -> dict:
    """Measure both packers; returns a flat dict of figures (times in seconds)."""
    small = synthetic_lengths(n_small, seed, capacity)
    total = int(small.sum())
    bfd, t_bfd = _timed(pack_best_fit_decreasing, small, capacity)
    order = np.random.default_rng(seed + 1).permutation(n_small)  # peers shuffle, then first-fit
    ff, t_ff = _timed(pack_first_fit, small, capacity, order=order)

    large = synthetic_lengths(n_large, seed + 2, capacity)
    bfd_large, t_large = _timed(pack_best_fit_decreasing, large, capacity)

    eff_bfd = packing_efficiency(int(small.sum()), len(bfd), capacity)
    eff_large = packing_efficiency(int(large.sum()), len(bfd_large), capacity)
    return {
        "capacity": capacity,
        "seed": seed,
        "n_small": n_small,
        "mean_length": total / max(n_small, 1),
        "total_tokens": total,
        "lower_bound_bins": lower_bound_bins(total, capacity),
        "bfd_bins": len(bfd),
        "bfd_efficiency": eff_bfd,
        "bfd_time_s": t_bfd,
        "ff_random_bins": len(ff),
        "ff_random_efficiency": packing_efficiency(int(small.sum()), len(ff), capacity),
        "ff_random_time_s": t_ff,
        "n_large": n_large,
        "bfd_large_bins": len(bfd_large),
        "bfd_large_lower_bound_bins": lower_bound_bins(int(large.sum()), capacity),
        "bfd_large_efficiency": eff_large,
        "bfd_large_time_s": t_large,
        "pass_efficiency": eff_bfd >= TARGET_EFFICIENCY,
        "pass_large_time": t_large < TARGET_LARGE_S,
    }


def main() -> None:
    r = run()
    ok = {True: "PASS", False: "FAIL"}
    print(
        f"packing benchmark: capacity {r['capacity']}, seed {r['seed']}, "
        f"lognormal lengths clipped to [8, {r['capacity']}]"
    )
    print(
        f"{r['n_small']} sequences, mean {r['mean_length']:.1f} tokens, "
        f"{r['total_tokens']} tokens, lower bound {r['lower_bound_bins']} bins"
    )
    print(
        f"  BFD (ours)            : {r['bfd_efficiency']:.4%} efficiency, "
        f"{r['bfd_bins']} bins, {r['bfd_time_s'] * 1e3:.1f} ms"
    )
    print(
        f"  first-fit, random ord.: {r['ff_random_efficiency']:.4%} efficiency, "
        f"{r['ff_random_bins']} bins, {r['ff_random_time_s'] * 1e3:.1f} ms"
    )
    print(
        f"{r['n_large']} sequences, BFD: {r['bfd_large_time_s']:.3f} s, "
        f"{r['bfd_large_efficiency']:.4%} efficiency, {r['bfd_large_bins']} bins "
        f"(lower bound {r['bfd_large_lower_bound_bins']})"
    )
    print(f"target: efficiency >= {TARGET_EFFICIENCY:.1%} -> {ok[r['pass_efficiency']]}")
    print(f"target: 1M lengths < {TARGET_LARGE_S:g} s -> {ok[r['pass_large_time']]}")


if __name__ == "__main__":
    main()

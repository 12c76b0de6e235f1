"""`make bench`: every benchmark, one after another, each printing its figures and target lines."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = [
    "bench_pipeline",
    "bench_packing",
    "bench_tokenize",
    "bench_tokenize_memory",
    "bench_train",
    "bench_fsdp",
    "bench_loss",
    "bench_smollm2",
    "bench_merge",
]


def main() -> None:
    for name in BENCHMARKS:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        importlib.import_module(name).main()
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

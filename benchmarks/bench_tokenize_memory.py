"""Benchmark the data stages' memory against the number of records: validate and tokenize on 20,000, 200,000 and
2,000,000 generated alpaca records (bench_tokenize's synthetic records, ~110 tokens each, 1 in 4 of them
duplicates that validate drops), sequence_len 2048, the built-in model's tokenizer.

Each stage core runs in a fresh process (the stage doorway, atomic output), and reports its resident-set
high-water mark. Target: tokenize's peak at 2,000,000 records <= 1.2x its peak at 20,000.
About 5 minutes on 2 cores, most of it tokenizing the 2,000,000 records.

    python benchmarks/bench_tokenize_memory.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the built-in tokenizer is built locally

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = (20_000, 200_000, 2_000_000)
TARGET = 1.2
CHUNK = 10_000


def generate(root: Path, n: int) -> None:
    """data/raw/big.jsonl of `n` alpaca records, written a chunk at a time (the generator's memory stays flat)."""
    from bench_tokenize import synthetic_records

    (root / "data/raw").mkdir(parents=True)
    shutil.copytree(REPO / "data/prompts", root / "data/prompts")  # the params check wants them
    with open(root / "data/raw/big.jsonl", "w", encoding="utf-8") as f:
        for first in range(0, n, CHUNK):
            for r in synthetic_records(min(CHUNK, n - first), seed=first, mean_tokens=80, max_tokens=400):
                f.write(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n")


def child(stage: str, root: Path) -> dict:
    """One stage core on `root` in this (fresh) process: its peak resident set."""
    from reprotune.config.check import check_params
    from reprotune.config.sections import build_params
    from reprotune.hardware import peak_rss_bytes
    from reprotune.stage import execute

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["datasets"] = [{"path": "data/raw/big.jsonl", "type": "alpaca"}]
    raw["tokenize"]["sequence_len"] = 2048
    filled, problems = check_params(raw, repo_root=root)
    if problems:
        raise SystemExit("\n".join(map(str, problems)))
    params = build_params(filled)
    if stage == "validate":
        from reprotune.data.validate import ValidateInputs, validate

        m = execute(validate, params, ValidateInputs(root), out=root / "data/validated")
        return {"peak": peak_rss_bytes(), "records": m["kept"]}
    from reprotune.tokenize.dataset import TokenizeInputs, tokenize

    validated = root / "data/validated"
    inputs = TokenizeInputs(
        validated / "records.parquet", validated / "datasets.json", root / "none", root / "models/base"
    )
    m = execute(tokenize, params, inputs, out=root / "data/packed")
    return {"peak": peak_rss_bytes(), "sequences": m["splits"]["train"]["sequences"] + m["splits"]["val"]["sequences"]}


def run() -> dict:
    from reprotune.model.builtin import build_tiny_llama

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llama(Path(tmp) / "base")  # its tokenizer; built here, so no stage process holds a model
        for n in SIZES:
            root = Path(tmp) / str(n)
            generate(root, n)
            (root / "models").mkdir()
            (root / "models/base").symlink_to(Path(tmp) / "base")
            for stage in ("validate", "tokenize"):
                done = subprocess.run(
                    [sys.executable, __file__, "--child", stage, str(root)], capture_output=True, text=True
                )
                if done.returncode:
                    raise RuntimeError(f"{stage} on {n} records failed:\n{done.stderr[-3000:]}")
                out[f"{stage}_{n}"] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(root)
    out["ratio"] = out[f"tokenize_{SIZES[-1]}"]["peak"] / out[f"tokenize_{SIZES[0]}"]["peak"]
    out["pass"] = out["ratio"] <= TARGET
    return out


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
        return
    r = run()
    for n in SIZES:
        v, t = r[f"validate_{n}"], r[f"tokenize_{n}"]
        print(
            f"{n:>9,} records: validate peak {v['peak'] / 1e6:6.0f} MB ({v['records']:,} kept), "
            f"tokenize peak {t['peak'] / 1e6:6.0f} MB ({t['sequences']:,} sequences)"
        )
    verdict = "PASS" if r["pass"] else "FAIL"
    print(f"tokenize at {SIZES[-1]:,} / at {SIZES[0]:,}: {r['ratio']:.2f}x; target <= {TARGET:g}x -> {verdict}")


if __name__ == "__main__":
    main()

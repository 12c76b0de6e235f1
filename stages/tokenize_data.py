"""Stage `tokenize`: data/validated/records.parquet -> data/packed/ (masked, split, packed rows).

Not named tokenize.py: `python stages/<any>.py` puts stages/ first on sys.path, where a tokenize.py
would shadow the standard library module of that name (imported by logging, linecache, inspect).
"""

import logging
from pathlib import Path

from transformers import AutoTokenizer

from reprotune.config import Params
from reprotune.io import atomic_dir, write_json
from reprotune.stage import run_stage
from reprotune.tokenize.dataset import tokenize_dataset

BASE, RECORDS, OUT = Path("models/base"), Path("data/validated/records.parquet"), Path("data/packed")
METRICS = Path("metrics/tokenize.json")


def main(params: Params) -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE, trust_remote_code=params.base.trust_remote_code)
    with atomic_dir(OUT) as tmp:
        metrics = tokenize_dataset(RECORDS, tokenizer, params.tokenize, tmp)
    write_json(METRICS, metrics)
    logging.info(
        "%d records -> %d sequences -> %d rows (%.2f%% packed; dropped %d too long, %d untrainable; truncated %d)",
        metrics["records"],
        metrics["sequences"],
        metrics["bins"],
        100 * metrics["packing_efficiency"],
        metrics["dropped_too_long"],
        metrics["dropped_no_trainable"],
        metrics["truncated"],
    )


if __name__ == "__main__":
    run_stage("tokenize", main)

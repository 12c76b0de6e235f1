"""Stage `evaluate`: base vs tuned (models/merged) on the validation split -> metrics and samples."""

import json
import logging
import time
from pathlib import Path

from reprotune.config import Params
from reprotune.evaluate import evaluate
from reprotune.io import atomic_file, write_json
from reprotune.stage import run_stage

BASE, TUNED, PACKED = Path("models/base"), Path("models/merged"), Path("data/packed")
METRICS, SAMPLES = Path("metrics/evaluate.json"), Path("metrics/samples.jsonl")


def main(params: Params) -> None:
    start = time.perf_counter()
    cfg = params.evaluate
    metrics, samples = evaluate(
        BASE, TUNED, PACKED, cfg.max_sequences, cfg.max_new_tokens, cfg.num_samples, params.base.trust_remote_code
    )
    with atomic_file(SAMPLES) as f:
        f.writelines(json.dumps(s, sort_keys=True, ensure_ascii=False) + "\n" for s in samples)
    write_json(METRICS, {**metrics, "seconds": round(time.perf_counter() - start, 3)})
    logging.info(
        "loss %s -> %s, exact match %s -> %s",
        metrics["base"]["loss"],
        metrics["tuned"]["loss"],
        metrics["base"]["exact_match"],
        metrics["tuned"]["exact_match"],
    )


if __name__ == "__main__":
    run_stage("evaluate", main)

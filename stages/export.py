"""Stage `export`: models/export/, the deployable folder (weights, tokenizer, card, manifest, GGUF)."""

import logging
from pathlib import Path

from reprotune.config import Params
from reprotune.export.bundle import build_export
from reprotune.io import atomic_dir
from reprotune.stage import run_stage

MERGED, PROVENANCE = Path("models/merged"), Path("models/base/reprotune_base.json")
# The card quotes the metrics of the stages that made the model. Not validate/tokenize: their metrics
# hold run times, and a clone that reruns those cheap stages would otherwise rerun export too.
METRICS = [Path(f"metrics/{stage}.json") for stage in ("train", "merge", "evaluate")]
OUT = Path("models/export")


def main(params: Params) -> None:
    with atomic_dir(OUT) as tmp:
        summary = build_export(params, MERGED, PROVENANCE, METRICS, tmp)
    logging.info("wrote %s: %d files, %.1f MB", OUT, summary["files"], summary["bytes"] / 1e6)


if __name__ == "__main__":
    run_stage("export", main)

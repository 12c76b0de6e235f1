"""Stage `validate`: every record of data.datasets kept (normalised) or rejected with a reason."""

import logging
import time
from pathlib import Path

from reprotune.config import Params
from reprotune.data.validate import validate
from reprotune.io import atomic_dir, write_json
from reprotune.stage import run_stage

OUT = Path("data/validated")
METRICS = Path("metrics/validate.json")


def main(params: Params) -> None:
    start = time.perf_counter()
    with atomic_dir(OUT) as tmp:
        metrics = validate(params.data, Path("."), tmp)
    write_json(METRICS, {**metrics, "seconds": round(time.perf_counter() - start, 3)})
    logging.info(
        "read %d records: kept %d, rejected %d, duplicates %d (rejects in %s/rejects.jsonl)",
        metrics["read"],
        metrics["kept"],
        metrics["rejected"],
        metrics["duplicates"],
        OUT,
    )


if __name__ == "__main__":
    run_stage("validate", main)

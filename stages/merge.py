"""Stage `merge`: models/base + models/adapter -> models/merged, verified against base+adapter logits."""

import logging
from pathlib import Path

from reprotune.config import Params
from reprotune.io import atomic_dir, write_json
from reprotune.merge import merge_and_verify
from reprotune.stage import run_stage

BASE, ADAPTER, PACKED = Path("models/base"), Path("models/adapter"), Path("data/packed")
OUT = Path("models/merged")
METRICS = Path("metrics/merge.json")


def main(params: Params) -> None:
    with atomic_dir(OUT) as tmp:  # a failed verification raises here: no models/merged, no metrics
        metrics = merge_and_verify(
            BASE,
            ADAPTER,
            PACKED,
            tmp,
            params.merge.dtype,
            params.merge.verify_sequences,
            params.export.max_shard_size,
            params.base.trust_remote_code,
        )
    write_json(METRICS, metrics)
    logging.info(
        "wrote %s (%d shards, %s); max |logit delta| %.3g",
        OUT,
        metrics["shards"],
        metrics["dtype"],
        metrics["max_abs_diff"],
    )


if __name__ == "__main__":
    run_stage("merge", main)

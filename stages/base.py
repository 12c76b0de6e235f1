"""Stage `base`: resolve base.model into models/base/ (built-in, local folder, or pinned hub commit)."""

import logging
from pathlib import Path

from reprotune.config import Params
from reprotune.io import atomic_dir
from reprotune.model.base import resolve_base
from reprotune.stage import run_stage

OUT = Path("models/base")


def main(params: Params) -> None:
    with atomic_dir(OUT) as tmp:
        provenance = resolve_base(
            params.base.model, params.base.revision, tmp, trust_remote_code=params.base.trust_remote_code
        )
    logging.info("base model %s (%s) ready in %s", provenance["model"], provenance["source"], OUT)


if __name__ == "__main__":
    run_stage("base", main)

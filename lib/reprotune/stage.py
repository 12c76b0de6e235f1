"""Shared doorway of the stage scripts: logging, the params check, and exit codes.

Exit codes: 0 done; 2 bad input (params or data), reported before any model is loaded;
1 anything else (a bug or a failed run), with the traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from reprotune.config import EXIT_BAD_INPUT, Params, load_params
from reprotune.config.declared import declared_params, restrict
from reprotune.errors import BadInput


def run_stage(
    name: str,
    body: Callable[[Params], None],
    params_path: str | Path = "params.yaml",
    dvc_yaml: str | Path = "dvc.yaml",
) -> None:
    """Check all params, then run `body` on a view holding only the keys dvc.yaml declares for `name`.

    Bad input exits 2 with its message before anything is loaded or written.
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        params = load_params(params_path)
        body(restrict(params, declared_params(name, dvc_yaml), name))
    except BadInput as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

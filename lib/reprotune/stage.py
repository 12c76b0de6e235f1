"""Shared doorway of the stage scripts: logging, the params check, and exit codes.

Exit codes: 0 done; 2 bad input (params or data), reported before any model is loaded;
1 anything else (a bug or a failed run), with the traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from reprotune.config import EXIT_BAD_INPUT, Params, ParamsError, load_params
from reprotune.data.readers import DataError

BAD_INPUT = (ParamsError, DataError)


def run_stage(name: str, body: Callable[[Params], None], params_path: str | Path = "params.yaml") -> None:
    """Check params, then run `body(params)`; bad input exits 2 with its message, nothing written."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        params = load_params(params_path)
        body(params)
    except BAD_INPUT as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

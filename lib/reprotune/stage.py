"""The doorway every stage script goes through: logging, warnings, the params check, the call of the
library core, atomic outputs, metrics with timing, and exit codes.

Every library core has one signature, `core(params, inputs, out_dir) -> metrics`:
  params   the checked params, restricted to the keys dvc.yaml declares for the stage (typed as Params)
  inputs   a frozen dataclass of the core's input paths (defaults: the pipeline's, see layout.py)
  out_dir  an empty temporary folder; the core writes its outputs there and returns its metrics
           (None on the non-main processes of a multi-process run: their folder is discarded)
The doorway then renames the folder over the stage's output (or moves the files it names into place),
writes the metrics, and logs the stage's report line.

Results apart from the run's own figures: what a stage produced (losses, counts, exact match) goes to its
metrics file, which DVC hashes into dvc.lock; how the run went on this machine (RUNTIME_KEYS: the wall time,
added here as `seconds`, throughput, peak memory, the device, merge's float rounding noise) goes to
metrics/runtime/<stage>.json, which dvc.yaml lists as top-level metrics: `dvc metrics show` and `dvc exp show`
read it, dvc.lock never hashes it. So a rerun that reproduces every output leaves dvc.lock byte-identical.

Exit codes: 0 done; 2 bad input (params or data), one message naming the key or file, reported before
any model is loaded where the check allows; 1 anything else (a bug or a failed run), with the traceback.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprotune.config import Params, load_params
from reprotune.config.declared import declared_params, restrict
from reprotune.errors import EXIT_BAD_INPUT, BadInput
from reprotune.io import atomic_dir, atomic_files, write_json
from reprotune.layout import runtime_file

Core = Callable[[Params, Any, Path], "dict | None"]

# Metrics keys that describe the run, not its result: they change between runs of the same inputs (time,
# memory, throughput, the device) or carry float rounding noise that does (the merge check's logit figures,
# on the same CPU with byte-identical weights).
RUNTIME_KEYS = frozenset(
    {
        "seconds",
        "train_seconds",
        "supervised_tokens_per_second",
        "peak_memory_bytes",
        "peak_memory_kind",
        "peak_rss_mb",
        "device",
        "max_abs_diff",
        "noise_floor",
        "logit_scale",
        "tolerance",
    }
)

# Library notices that say nothing about this run: API renames that peft and the Trainer call inside
# transformers (the stages use the new names themselves); matched narrowly, by category and message.
QUIET_WARNINGS = ((FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"),)
# bitsandbytes logs that its optional hub-fetched CPU kernels are missing; its own CPU path runs instead
QUIET_LOG_PREFIXES = ("Failed to load CPU gemm_4bit_forward from kernels-community",)


def _quiet(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(QUIET_LOG_PREFIXES)


def run_stage(
    name: str,
    core: Core,
    inputs: Any,
    *,
    out: Path | None = None,
    files: dict[str, Path] | None = None,
    metrics: Path | None = None,
    report: Callable[[dict], str] | None = None,
    params_path: str | Path = "params.yaml",
    dvc_yaml: str | Path = "dvc.yaml",
) -> dict | None:
    """Run stage `name` on the params its dvc.yaml entry declares (see `execute`); bad input exits 2."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        params = restrict(load_params(params_path), declared_params(name, dvc_yaml), name)
        result = execute(core, params, inputs, out=out, files=files, metrics=metrics, runtime=runtime_file(name))
    except BadInput as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if result is not None and report is not None:
        logging.info("%s", report(result))
    return result


def execute(
    core: Core,
    params: Params,
    inputs: Any,
    *,
    out: Path | None = None,
    files: dict[str, Path] | None = None,
    metrics: Path | None = None,
    runtime: Path | None = None,
) -> dict | None:
    """Call `core` with an empty temporary folder. On success the folder replaces `out` (a folder
    output) or the `files` it holds (name in the folder -> target path) are moved into place; the
    metrics, with `seconds` added, are returned whole and written split: RUNTIME_KEYS to `runtime`, the
    rest to `metrics`. On error nothing is left."""
    start = time.perf_counter()
    try:
        with atomic_dir(out) if out is not None else atomic_files(files) as tmp:
            result = core(params, inputs, tmp)
            if result is None:  # not the main process: nothing of this one is kept
                raise _Discard
    except _Discard:
        return None
    result = {**result, "seconds": round(time.perf_counter() - start, 3)}
    if metrics is not None:
        write_json(metrics, {k: v for k, v in result.items() if k not in RUNTIME_KEYS})
    if runtime is not None:
        write_json(runtime, {k: v for k, v in result.items() if k in RUNTIME_KEYS})
    return result


class _Discard(Exception):
    """Unwinds the output folder of a process whose core returned no metrics."""

"""Which checkpoint to resume from: only complete ones written by a run with the same inputs.

The HF Trainer writes `checkpoint-<step>/` file by file; a kill -9 can leave one half-written, and
a checkpoint of a run with other params or data would resume the wrong training. So a checkpoint
counts only when it holds a marker, written atomically (io.write_json: temp file + rename) after
the Trainer finished saving it, whose fingerprint equals this run's. The fingerprint hashes:
- the params the stage reads (quant.*, lora.*, train.*),
- every file of data/packed (manifest and parquet: a fixed typo keeps the manifest's counts),
- the base's config.json and reprotune_base.json (its provenance, with file hashes for local and
  hub bases; the weights themselves are not hashed, which would cost minutes on a 70B base),
- the number of processes and the resolved hardware settings (dtype, attention, device).
On start every other checkpoint folder is deleted: the Trainer names folders by step only, so a
stale `checkpoint-50` would otherwise be overwritten file by file and mixed with the new run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from reprotune.io import dumps_json, sha256_file, sha256_tree, write_json

MARKER = "reprotune_complete.json"
PREFIX = "checkpoint-"
BASE_FILES = ("config.json", "reprotune_base.json")

log = logging.getLogger(__name__)


def fingerprint(params_read: dict, packed_dir: Path, base_dir: Path, run: dict) -> str:
    """Hex SHA-256 over everything that shapes the training trajectory (see the module docstring)."""
    h = hashlib.sha256(dumps_json({"params": params_read, "run": run}).encode())
    for rel, digest in sha256_tree(packed_dir).items():
        h.update(f"data/{rel}:{digest}\n".encode())
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            h.update(f"base/{name}:{sha256_file(base_dir / name)}\n".encode())
    return h.hexdigest()


def write_marker(checkpoint: Path, fp: str, step: int) -> None:
    write_json(checkpoint / MARKER, {"fingerprint": fp, "step": step})


def step_of(checkpoint: Path) -> int | None:
    suffix = checkpoint.name[len(PREFIX) :]
    return int(suffix) if checkpoint.name.startswith(PREFIX) and suffix.isdigit() else None


def is_complete(checkpoint: Path, fp: str) -> bool:
    try:
        marker = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fp and marker.get("step") == step_of(checkpoint)


def select_resume(ckpt_dir: Path, fp: str, prune: bool) -> Path | None:
    """Newest complete checkpoint of this run, or None; with `prune`, delete every other kind."""
    found = sorted((p for p in Path(ckpt_dir).glob(PREFIX + "*") if p.is_dir() and step_of(p) is not None), key=step_of)
    complete = [p for p in found if is_complete(p, fp)]
    if prune:
        for p in found:
            if p not in complete:
                log.info("deleting %s: half-written, or written by a run with other inputs", p)
                shutil.rmtree(p)
    return complete[-1] if complete else None

"""`build_export`: the deployable folder, assembled from the merged model and the pipeline's records.

Contents: every file of the merged model folder (safetensors shards and index, config,
tokenizer, chat template, generation config) copied byte for byte; `model.<dtype>.gguf` when
export.formats has gguf; README.md (the model card); manifest.json, written last and checked
before returning. Nothing in it depends on the machine or the time: equal inputs give equal bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from reprotune import __version__
from reprotune.export.card import model_title, render_card
from reprotune.export.gguf import check_llama, write_gguf
from reprotune.export.manifest import verify_manifest, write_manifest
from reprotune.io import atomic_file, sha256_file

log = logging.getLogger(__name__)


def dataset_hashes(params: Any, root: Path) -> list[dict]:
    """path, type and SHA-256 of each data.datasets file (hub datasets: no local file to hash)."""
    out = []
    for d in params.data.datasets:
        path = Path(root) / d.path
        out.append({"path": d.path, "type": d.type,
                    "sha256": sha256_file(path) if path.is_file() else None})  # fmt: skip
    return out


def read_metrics(files: list[Path]) -> dict[str, dict]:
    """The metrics files that exist, keyed by stage name (the file's stem)."""
    return {Path(p).stem: json.loads(Path(p).read_text(encoding="utf-8")) for p in files if Path(p).is_file()}


def build_export(
    params: Any,
    merged_dir: Path,
    provenance_file: Path,
    metrics_files: list[Path],
    out_dir: Path,
    root: Path = Path("."),
) -> dict:
    """Fill the existing empty `out_dir`; returns a summary (files, bytes, formats).

    `metrics_files` are read by name, not globbed, so the card holds exactly the stage's declared deps.
    """
    formats = params.export.formats
    if "gguf" in formats:  # refuse before copying gigabytes
        check_llama(json.loads((Path(merged_dir) / "config.json").read_text(encoding="utf-8")))
    for p in sorted(Path(merged_dir).iterdir()):
        if p.is_file():
            shutil.copyfile(p, Path(out_dir) / p.name)
    provenance = json.loads(Path(provenance_file).read_text(encoding="utf-8"))
    if "gguf" in formats:
        dtype = params.export.gguf_dtype
        write_gguf(merged_dir, Path(out_dir) / f"model.{dtype}.gguf", dtype, model_title(provenance["model"]))
    files = sorted(p.name for p in Path(out_dir).iterdir())
    card = render_card(
        params, provenance, dataset_hashes(params, root), files, read_metrics(metrics_files), __version__
    )
    with atomic_file(Path(out_dir) / "README.md") as f:
        f.write(card)
    manifest = write_manifest(out_dir)
    verify_manifest(out_dir)
    size = sum((Path(out_dir) / name).stat().st_size for name in manifest["files"])
    log.info("exported %d files (%.1f MB), formats %s", len(manifest["files"]), size / 1e6, list(formats))
    return {"files": len(manifest["files"]), "bytes": size, "formats": list(formats)}

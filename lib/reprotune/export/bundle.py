"""`build_export`: the deployable folder, assembled from the merged model and the pipeline's records.

Contents: every file of the merged model folder (safetensors shards and index, config,
tokenizer, chat template, generation config) copied byte for byte; `model.<dtype>.gguf` and an
Ollama `Modelfile` for it when export.formats has gguf; README.md (the model card); manifest.json,
written last and checked before returning. Nothing in it depends on the machine or the time: equal
inputs give equal bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from reprotune import __version__, layout
from reprotune.config import Params
from reprotune.export.card import model_title, render_card
from reprotune.export.gguf import check_llama, write_gguf
from reprotune.export.manifest import verify_manifest, write_manifest
from reprotune.export.modelfile import render_modelfile
from reprotune.io import atomic_file, sha256_file
from reprotune.loading import PROVENANCE_FILE, read_config, stop_token_ids

log = logging.getLogger(__name__)
# The card quotes the metrics of the stages that made the model: how many replay rows it learnt from,
# how training, the merge check and the evaluation went. Not validate/tokenize: the card hashes the data.
QUOTED_STAGES = ("replay", "train", "merge", "evaluate")
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ExportInputs:
    merged: Path = layout.MERGED
    provenance: Path = layout.BASE / PROVENANCE_FILE
    metrics: tuple[Path, ...] = field(default_factory=lambda: tuple(map(layout.metrics_file, QUOTED_STAGES)))
    """Read by name, not globbed, so the card holds exactly the stage's declared deps."""
    repo_root: Path = Path(".")
    """data.datasets paths are hashed relative to it."""


def write_modelfile(model_dir: Path, gguf_file: str, path: Path) -> None:
    """Ollama's Modelfile for `gguf_file`, with the chat template and stop tokens of `model_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path.write_text(render_modelfile(gguf_file, tokenizer, stop_token_ids(model_dir, tokenizer)), encoding="utf-8")


def dataset_hashes(params: Params, root: Path) -> list[dict]:
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


def build_export(params: Params, inputs: ExportInputs, out_dir: Path) -> dict:
    """Fill the existing empty `out_dir`; returns a summary (files, bytes, formats, the evaluation)."""
    merged_dir, formats = Path(inputs.merged), params.export.formats
    if "gguf" in formats:  # refuse before copying gigabytes
        check_llama(read_config(merged_dir))
    for p in sorted(merged_dir.iterdir()):
        if p.is_file():
            shutil.copyfile(p, Path(out_dir) / p.name)
    provenance = json.loads(Path(inputs.provenance).read_text(encoding="utf-8"))
    if "gguf" in formats:
        dtype = params.export.gguf_dtype
        gguf_file = f"model.{dtype}.gguf"
        write_gguf(merged_dir, Path(out_dir) / gguf_file, dtype, model_title(provenance["model"]))
        write_modelfile(merged_dir, gguf_file, Path(out_dir) / MODELFILE)
    files = sorted(p.name for p in Path(out_dir).iterdir())
    metrics = read_metrics(list(inputs.metrics))
    card = render_card(params, provenance, dataset_hashes(params, inputs.repo_root), files, metrics, __version__)
    with atomic_file(Path(out_dir) / "README.md") as f:
        f.write(card)
    manifest = write_manifest(out_dir)
    verify_manifest(out_dir)
    size = sum((Path(out_dir) / name).stat().st_size for name in manifest["files"])
    log.info("exported %d files (%.1f MB), formats %s", len(manifest["files"]), size / 1e6, list(formats))
    return {
        "files": len(manifest["files"]),
        "bytes": size,
        "formats": list(formats),
        "evaluate": metrics.get("evaluate", {}),
    }

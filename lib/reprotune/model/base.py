"""Resolve the configured base model to a pinned copy in a folder, with a provenance record.

Four sources, tried in this order:
- `builtin:<name>`: built here from fixed inputs (see builtin.py), no network.
- a local GGUF file (`*.gguf`, relative to the repo root): dequantized into safetensors with its
  tokenizer and chat template (see gguf_base.py).
- a local folder (relative to the repo root): its weights and tokenizer files are copied.
- a Hugging Face hub id `org/name`: the given revision is resolved to a commit sha first and the
  download is pinned to that sha, so a moving branch or tag cannot change the base under DVC.

Then base.chat_template, base.special_tokens and base.tokens are applied to the tokenizer
(chat_templates.py); tokens new to the vocabulary get embedding rows (vocab.py).
Only safetensors weights are accepted: pickle weights (*.bin, *.pt) can run code when loaded.
The provenance dict is also written to `<out_dir>/reprotune_base.json`; it never holds a token
or an absolute path (the model is recorded as the user wrote it).
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune.config import Params
from reprotune.config.check import BUILTIN_PREFIX
from reprotune.errors import BadInput
from reprotune.files import check_model_folder
from reprotune.io import sha256_tree, write_json
from reprotune.loading import PROVENANCE_FILE, TOKENIZER_FILES
from reprotune.model.builtin import build_tiny_llama
from reprotune.model.chat_templates import apply_tokenizer_params
from reprotune.model.gguf_base import convert_gguf
from reprotune.tensors import INDEX_NAME

BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {"tiny-llama": build_tiny_llama}

# Files a model folder needs for loading, tokenizing and chat formatting; never pickles.
LOCAL_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_NAME,
    *TOKENIZER_FILES,
]
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.jinja", "*.tiktoken",
                "merges.txt", "vocab.txt"]  # fmt: skip
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
# Custom modelling code is only wanted when the user opted in to running it.
CODE_PATTERNS = ["*.py"]


@dataclass(frozen=True)
class BaseInputs:
    repo_root: Path = Path(".")
    """Local base models are read relative to it (they lie under models/local/)."""


def resolve_base(params: Params, inputs: BaseInputs, out_dir: Path) -> dict[str, Any]:
    """Fill the empty `out_dir` with the base model of params.base; return (and write) its provenance."""
    cfg = params.base
    model, revision, trust_remote_code = cfg.model, cfg.revision, cfg.trust_remote_code
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise RuntimeError(f"base model output folder {out_dir} is not empty")
    local = Path(model) if Path(model).is_absolute() else Path(inputs.repo_root) / model
    if model.startswith(BUILTIN_PREFIX):
        prov = _from_builtin(model, out_dir)
    elif model.endswith(".gguf"):
        if not local.is_file():
            raise BadInput(f"base.model: GGUF file {model!r} not found (`make real-model` fetches SmolLM2's)")
        prov = convert_gguf(model, local, out_dir, cfg.gguf_dtype)
    elif local.exists():
        prov = _from_local(model, local, out_dir, trust_remote_code)
    else:
        prov = _from_hub(model, revision, out_dir, trust_remote_code)
    prov["trust_remote_code"] = bool(trust_remote_code)
    tokenizer = apply_tokenizer_params(
        out_dir, cfg.chat_template, cfg.chat_template_jinja, cfg.special_tokens, cfg.tokens, trust_remote_code
    )
    if tokenizer:
        prov["tokenizer"] = tokenizer
    write_json(out_dir / PROVENANCE_FILE, prov)
    return prov


def _from_builtin(model: str, out_dir: Path) -> dict[str, Any]:
    name = model[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise BadInput(f"base.model: unknown built-in model {model!r}; known: {known}")
    BUILTIN_MODELS[name](out_dir)
    return {"source": "builtin", "model": model, "revision": None, "commit_sha": None}


def _from_local(model: str, src: Path, out_dir: Path, trust_remote_code: bool) -> dict[str, Any]:
    if not src.is_dir():
        raise BadInput(f"base.model: {model!r} is not a folder")
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    _check_weights(model, names)
    patterns = LOCAL_PATTERNS + (CODE_PATTERNS if trust_remote_code else [])
    kept = [name for name in names if _matches(name, patterns) and not _matches(name, PICKLE_PATTERNS)]
    check_model_folder(src, kept)  # a broken or half-copied folder stops here (exit 2), not at training
    for name in kept:
        shutil.copyfile(src / name, out_dir / name)  # follows symlinks, e.g. an HF cache snapshot
    # A folder has no revision; its content is pinned by the file hashes instead.
    return {"source": "local", "model": model, "revision": None, "commit_sha": None,
            "files": sha256_tree(out_dir)}  # fmt: skip


def _from_hub(model: str, revision: str | None, out_dir: Path, trust_remote_code: bool) -> dict[str, Any]:
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise BadInput(f"base.model: {model!r} is neither builtin:<name>, an existing folder, nor a hub id org/name")
    if not revision:
        raise BadInput(
            f"base.revision: hub model {model!r} needs a revision (a commit sha, tag or branch) to be reproducible"
        )
    from huggingface_hub import HfApi, snapshot_download

    sha = HfApi().model_info(model, revision=revision).sha
    snapshot_download(
        model,
        revision=sha,  # the resolved commit, never the moving name
        local_dir=out_dir,
        allow_patterns=HUB_PATTERNS + (CODE_PATTERNS if trust_remote_code else []),
        ignore_patterns=PICKLE_PATTERNS,
    )
    # snapshot_download keeps download metadata (etags, timestamps) here; it must not enter the output.
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    _check_weights(model, names)
    check_model_folder(out_dir, [name for name in names if _matches(name, LOCAL_PATTERNS)])
    return {"source": "hub", "model": model, "revision": revision, "commit_sha": sha,
            "files": sha256_tree(out_dir)}  # fmt: skip


def _check_weights(model: str, names: list[str]) -> None:
    if "config.json" not in names:
        raise BadInput(f"base.model: {model!r} has no config.json")
    if not any(fnmatch.fnmatch(n, "*.safetensors") for n in names):
        if any(_matches(n, PICKLE_PATTERNS) for n in names):
            raise BadInput(
                f"base.model: {model!r} has only pickle weights (*.bin/*.pt); safetensors only: "
                "pickles can run arbitrary code when loaded. Convert them to .safetensors first."
            )
        raise BadInput(f"base.model: {model!r} has no *.safetensors weights")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)

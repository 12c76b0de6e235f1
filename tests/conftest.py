"""Shared fixtures. Tests never touch a hub: everything they use is built or shipped here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> Path:
    """A git-tracked copy of the repo's sources (no venv, no outputs) with its own git and DVC state."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


# The shipped params with a pipeline run cut to about a minute on 2 cores: 2 optimizer steps, a few
# sequences evaluated and verified. Everything else (data, base, template, LoRA, merge, export) is shipped.
SHORT_RUN = {
    "train": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1},
    "merge": {"verify_sequences": 2},
    "evaluate": {"max_sequences": 8, "max_new_tokens": 8, "num_samples": 2, "prompts": ["What is 2 + 3?"]},
}


def shorten_training(repo: Path) -> None:
    """Write SHORT_RUN into repo/params.yaml (comments are not kept: this is a test copy)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SHORT_RUN.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def output_hashes(repo: Path) -> dict[str, str]:
    """SHA-256 of every file of every stage output in dvc.yaml, by path under the output's parent."""
    from reprotune.io import sha256_tree

    hashes = {}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            hashes |= {f"{path.name}/{k}": v for k, v in sha256_tree(path.parent).items() if k.startswith(path.name)}
    return hashes


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny model, built once per test session; tests only read it."""
    from reprotune.model.builtin import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(out)
    return out


def tied_copy(src: Path, out: Path) -> Path:
    """`src`'s model folder in `out` with its output head tied to the embeddings (no lm_head.weight stored, as
    SmolLM2, Qwen2-0.5B and Gemma store it)."""
    import json

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return out


@pytest.fixture(scope="session")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its output head tied to the embeddings."""
    return tied_copy(tiny_model_dir, tmp_path_factory.mktemp("tied"))


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")

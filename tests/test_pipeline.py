"""The pipeline under DVC, in a temporary copy of the repo: stages run, no-op reruns, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from reprotune.io import sha256_tree

BIN = Path(sys.executable).parent


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def test_repro_base_and_validate(repo_copy):
    result = dvc(repo_copy, "repro", "base", "validate")
    assert "Running stage 'base'" in result.stdout and "Running stage 'validate'" in result.stdout
    metrics = json.loads((repo_copy / "metrics/validate.json").read_text())
    assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"] == 3000
    first = sha256_tree(repo_copy / "models/base") | sha256_tree(repo_copy / "data/validated")
    assert "Data and pipelines are up to date" in dvc(repo_copy, "repro", "base", "validate").stdout
    # Outputs are deterministic: forcing a rerun gives the same bytes (so DVC hashes match everywhere).
    dvc(repo_copy, "repro", "--force", "base", "validate")
    assert sha256_tree(repo_copy / "models/base") | sha256_tree(repo_copy / "data/validated") == first


def test_stage_exits_2_on_bad_params_before_loading_anything(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["learning_rate"] = "fast"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "stages/base.py"], cwd=repo_copy, capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.learning_rate" in result.stderr
    assert not (repo_copy / "models/base").exists()


def test_stage_exits_2_on_unusable_data_and_writes_nothing(repo_copy):
    (repo_copy / "data/sample/alpaca.jsonl").write_text("this is not json\n")
    result = subprocess.run([sys.executable, "stages/validate.py"], cwd=repo_copy, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "not JSON Lines" in result.stderr
    assert not (repo_copy / "data/validated").exists()
    assert not list((repo_copy / "data").glob(".validated.tmp-*"))

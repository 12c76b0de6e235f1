"""A shared DVC remote: one clone runs the pipeline and pushes its run cache; a second clone pulls it
and `dvc repro` runs no stage, restoring every output byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo
from reprotune.io import sha256_tree

BIN = Path(sys.executable).parent


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def outputs(repo: Path) -> dict[str, str]:
    hashes = {}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []):
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            hashes |= {f"{path.name}/{k}": v for k, v in sha256_tree(path).items()}
    return hashes


@pytest.mark.slow
def test_second_clone_restores_everything_from_the_shared_remote(tmp_path):
    remote = tmp_path / "remote"
    first = copy_repo(tmp_path / "first")
    dvc(first, "remote", "add", "-d", "shared", str(remote))
    assert "Running stage" in dvc(first, "repro")
    dvc(first, "push", "--run-cache")

    # A teammate's clone with the committed dvc.lock: pull, and repro has nothing to run.
    second = copy_repo(tmp_path / "second")
    (second / "dvc.lock").write_bytes((first / "dvc.lock").read_bytes())
    dvc(second, "remote", "add", "-d", "shared", str(remote))
    dvc(second, "pull", "--run-cache")
    log = dvc(second, "repro")
    assert "Running stage" not in log, log
    assert outputs(second) == outputs(first)

    # A clone with no lock at all (a branch that never ran): the run cache alone restores every stage.
    third = copy_repo(tmp_path / "third")
    dvc(third, "remote", "add", "-d", "shared", str(remote))
    dvc(third, "pull", "--run-cache", "--allow-missing")
    log = dvc(third, "repro", "--pull")
    assert "Running stage" not in log and "is cached - skipping run" in log, log
    assert outputs(third) == outputs(first)

    # Determinism pays here: a clone that runs the first stages itself (ignoring the run cache) gets
    # byte-identical outputs, so every later stage's deps match and they are restored, not rerun.
    fourth = copy_repo(tmp_path / "fourth")
    dvc(fourth, "remote", "add", "-d", "shared", str(remote))
    assert "Running stage 'validate'" in dvc(fourth, "repro", "--no-run-cache", "base", "validate")
    dvc(fourth, "pull", "--run-cache", "--allow-missing")
    log = dvc(fourth, "repro", "--pull")
    assert "Running stage" not in log, log
    assert outputs(fourth) == outputs(first)

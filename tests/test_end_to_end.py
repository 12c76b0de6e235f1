"""The whole pipeline under `dvc repro` in a temporary copy of the repo, run once for this module:
every stage runs offline on the built-in model and the sample data (training cut to 2 steps), the
exported model loads and generates, and a shared DVC remote lets other clones restore everything
without running a stage."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, output_hashes, shorten_training

BIN = Path(sys.executable).parent
STAGES = list(yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"])


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def short_copy(dest: Path) -> Path:
    """A copy of the repo whose committed params train for 2 steps (conftest.SHORT_RUN): every stage still
    runs for real; `make run` and the README give the full-length figures."""
    repo = copy_repo(dest)
    shorten_training(repo)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short"], cwd=repo, check=True
    )
    return repo


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A clone that ran the full pipeline and pushed its results and run cache to a local remote."""
    root = tmp_path_factory.mktemp("e2e")
    repo = short_copy(root / "first")
    dvc(repo, "remote", "add", "-d", "shared", str(root / "remote"))
    log = dvc(repo, "repro")
    dvc(repo, "push", "--run-cache")
    return repo, root / "remote", log


def test_every_stage_runs_and_a_rerun_is_a_no_op(pipeline):
    repo, _, log = pipeline
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in log
    assert "Data and pipelines are up to date" in dvc(repo, "repro")


def test_tuned_model_beats_the_base_and_metrics_are_complete(pipeline):
    repo, _, _ = pipeline
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluate["as_shipped"]["loss"] < evaluate["base"]["loss"]
    assert abs(evaluate["shipped_vs_trained"]["loss"]) < 0.05 * evaluate["base"]["loss"]
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["eval_loss"] is not None and train["steps"] > 0
    validate = json.loads((repo / "metrics/validate.json").read_text())
    assert validate["read"] == validate["kept"] + validate["rejected"] + validate["duplicates"]
    assert (repo / "dvclive/plots/metrics").is_dir()


def test_export_loads_and_generates(pipeline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprotune.export.manifest import verify_manifest

    folder = pipeline[0] / "models/export"
    verify_manifest(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]), str)


def test_second_clone_restores_everything_from_the_shared_remote(pipeline, tmp_path):
    first, remote, _ = pipeline

    # A teammate's clone with the committed dvc.lock: pull, and repro has nothing to run.
    second = short_copy(tmp_path / "second")
    (second / "dvc.lock").write_bytes((first / "dvc.lock").read_bytes())
    dvc(second, "remote", "add", "-d", "shared", str(remote))
    dvc(second, "pull", "--run-cache")
    log = dvc(second, "repro")
    assert "Running stage" not in log, log
    assert output_hashes(second) == output_hashes(first)

    # A clone with no lock at all (a branch that never ran): the run cache alone restores every stage.
    third = short_copy(tmp_path / "third")
    dvc(third, "remote", "add", "-d", "shared", str(remote))
    dvc(third, "pull", "--run-cache", "--allow-missing")
    log = dvc(third, "repro", "--pull")
    assert "Running stage" not in log and "is cached - skipping run" in log, log
    assert output_hashes(third) == output_hashes(first)


def test_deterministic_outputs_let_later_stages_come_from_the_cache(pipeline, tmp_path):
    """A clone that runs the first stages itself gets byte-identical outputs, so every later stage's
    deps match the shared run cache and they are restored, not rerun."""
    first, remote, _ = pipeline
    clone = short_copy(tmp_path / "clone")
    dvc(clone, "remote", "add", "-d", "shared", str(remote))
    assert "Running stage 'tokenize'" in dvc(clone, "repro", "--no-run-cache", "tokenize")
    dvc(clone, "pull", "--run-cache", "--allow-missing")
    log = dvc(clone, "repro", "--pull")
    assert "Running stage" not in log, log
    assert output_hashes(clone) == output_hashes(first)


def test_a_forced_rerun_reproduces_every_output_and_leaves_dvc_lock_byte_identical(pipeline):
    """Timings, memory and float rounding noise live in metrics/runtime/ (top-level metrics, not locked), so
    rerunning every stage on the same inputs changes them and nothing in dvc.lock: a retrain that changed
    nothing commits nothing."""
    repo, _, _ = pipeline
    lock = (repo / "dvc.lock").read_bytes()
    runtime = {path.name: path.read_bytes() for path in (repo / "metrics/runtime").iterdir()}
    assert sorted(runtime) == sorted(f"{stage}.json" for stage in STAGES)
    log = dvc(repo, "repro", "--force")
    assert all(f"Running stage '{stage}'" in log for stage in STAGES), log
    assert (repo / "dvc.lock").read_bytes() == lock
    assert {path.name: path.read_bytes() for path in (repo / "metrics/runtime").iterdir()} != runtime
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    train = next(iter(shown.values()))["data"]["metrics/runtime/train.json"]["data"]
    assert train["train_seconds"] > 0 and train["peak_memory_bytes"] > 0


@pytest.mark.slow  # 2.5 min; tests/test_workflow_steps.py runs `dvc exp run -S` sweeps in `make test`
def test_a_queued_sweep_reruns_only_train_onwards_and_shows_in_exp_show(pipeline):
    """`dvc exp run --queue -S ...` twice, `dvc queue start`, `dvc exp show`: the README's sweep, shortened
    to 2 optimizer steps per experiment. Last in this module: it adds experiment refs to the first clone."""
    repo, _, _ = pipeline
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True)  # the user commits the run's lock
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], cwd=repo, check=True)
    for rank in (4, 8):
        dvc(repo, "exp", "run", "--queue", "-S", f"lora.r={rank}", "-S", "train.max_steps=2")
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 900
    while any(word in dvc(repo, "queue", "status") for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, dvc(repo, "queue", "status")
        time.sleep(5)

    ranks = {}
    for entry in json.loads(dvc(repo, "exp", "show", "--json")):
        for exp in entry.get("experiments") or []:
            rev = exp["revs"][0]
            assert exp["executor"]["state"] == "success", dvc(repo, "queue", "logs", rev["name"])
            log = dvc(repo, "queue", "logs", rev["name"])
            assert all(f"Stage '{s}' didn't change" in log for s in ("base", "validate", "tokenize")), log
            assert all(f"Running stage '{s}'" in log for s in ("train", "merge", "evaluate", "export")), log
            data = rev["data"]
            tuned = data["metrics"]["metrics/evaluate.json"]["data"]["as_shipped"]
            ranks[data["params"]["params.yaml"]["data"]["lora"]["r"]] = tuned["loss"]
            assert data["metrics"]["metrics/runtime/train.json"]["data"]["train_seconds"] > 0  # carried in git
    assert sorted(ranks) == [4, 8] and all(loss > 0 for loss in ranks.values())

"""train.report_to: W&B (offline), MLflow (a local file store) and TensorBoard get the run's curves and params
through the Trainer's callbacks, offline; names from params, credentials never written; missing packages and
contradictions refused before any model is loaded; renaming a run changes no output."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from reprotune import testing as synthetic
from reprotune.errors import BadInput
from reprotune.stage import execute
from reprotune.train import run as run_module
from reprotune.train import trackers
from reprotune.train.run import TrainInputs

from helpers import params_with

SEQUENCE_LEN = 128
FAST = {
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 4,
    "save_steps": 2,
    "eval_steps": 2,
    "logging_steps": 1,
}
FULL, LAST = 1, 4  # LevelDB log chunk kinds that end a record
SECRET = "wandb-secret-0123456789abcdef0123456789abcdef"


NEEDS_TRACKERS = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("wandb", "mlflow", "tensorboard")),
    reason="the wandb, mlflow and tensorboard extras are not installed (make test installs them)",
)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    shutil.copytree(tiny_model_dir, root / "models/base")
    seqs = synthetic.sequences(40, seed=0, vocab=4096, max_len=SEQUENCE_LEN, mean_len=40)
    synthetic.write_packed_dir(root / "data/packed", {"train": seqs[:32], "val": seqs[32:]}, SEQUENCE_LEN, True)
    return root


def train(params, root: Path) -> dict:
    return execute(run_module.train, params, TrainInputs.under(root), out=root / "models/adapter")


def wandb_records(path: Path):
    """The records of an offline W&B run file (run-<id>.wandb): LevelDB's log format (32 KiB blocks, each record
    cut into chunks behind a 7-byte header: crc32, length, kind) after W&B's 7-byte file header, each record one
    protobuf `Record`. Read here directly: wandb 0.31 keeps no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]


def logged_losses(root: Path) -> list[float]:
    lines = (root / "dvclive/plots/metrics/train/loss.tsv").read_text().split("\n")[1:]
    return [float(line.split("\t")[1]) for line in lines if line]


@pytest.fixture(scope="module")
def tracked(project, monkeypatch_module):
    """One run reported to every tracker, with a credential in the environment."""
    monkeypatch_module.setenv("WANDB_API_KEY", SECRET)
    params = params_with(
        train={
            **FAST,
            "report_to": ["dvclive", "wandb", "mlflow", "tensorboard"],
            "wandb_project": "reprotune-test",
            "wandb_name": "offline-run",
            "wandb_mode": "offline",
            "mlflow_experiment_name": "reprotune-test",
        }
    )
    metrics = train(params, project)
    return project, metrics


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@NEEDS_TRACKERS
def test_wandb_offline_run_folder_has_the_train_loss_and_no_credential(tracked):
    root, metrics = tracked
    runs = list((root / "trackers/wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((root / "trackers").rglob("*"))[:20]
    history = wandb_history(next(runs[0].glob("run-*.wandb")))
    losses = [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    print(f"\nW&B offline run {runs[0].name}: train/loss by step {losses}")
    assert losses == [(step, pytest.approx(loss)) for step, loss in enumerate(logged_losses(root), start=1)]
    assert [h["eval/loss"] for h in history if "eval/loss" in h][-1] == pytest.approx(metrics["eval_loss"])
    for path in [*runs[0].rglob("*"), root / "models/adapter/training_config.json"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert os.environ.get("WANDB_PROJECT") is None  # the stage's settings do not outlive the run


@NEEDS_TRACKERS
def test_mlflow_file_store_has_the_runs_metrics_and_params(tracked):
    import mlflow

    root, metrics = tracked
    client = mlflow.MlflowClient(tracking_uri=(root / "trackers/mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("reprotune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    eval_loss = client.get_metric_history(run.info.run_id, "eval_loss")[-1].value
    steps = [(m.step, m.value) for m in history]
    print(f"\nMLflow run {run.info.run_name!r}: loss by step {steps}, eval_loss {eval_loss}")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(logged_losses(root))
    assert eval_loss == pytest.approx(metrics["eval_loss"])
    assert run.data.params["learning_rate"] == str(params_with().train.learning_rate)
    assert run.data.params["gradient_accumulation_steps"] == "2"


@NEEDS_TRACKERS
def test_tensorboard_events_are_written(tracked):
    root, _ = tracked
    assert list((root / "trackers/tensorboard").glob("events.out.tfevents.*"))


@NEEDS_TRACKERS
def test_renaming_the_tracked_run_changes_no_output(tracked, tmp_path, tiny_model_dir):
    """Tracker keys shape no weight: the adapter of a run without trackers is byte-identical."""
    root, _ = tracked
    plain = tmp_path / "plain"
    shutil.copytree(root / "models/base", plain / "models/base")
    shutil.copytree(root / "data/packed", plain / "data/packed")
    train(params_with(train=FAST), plain)
    for name in ("adapter_model.safetensors", "training_config.json", "adapter_config.json"):
        assert (plain / "models/adapter" / name).read_bytes() == (root / "models/adapter" / name).read_bytes(), name
    assert logged_losses(plain) == logged_losses(root)


def test_a_missing_tracker_package_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(BadInput, match=r"train.report_to: wandb needs the wandb package.*'\.\[wandb\]'"):
        trackers.require_trackers(("dvclive", "wandb"))


def test_params_names_win_over_the_environment_and_unset_ones_leave_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team-from-env")
    cfg = params_with(train={"report_to": ["dvclive", "wandb"], "wandb_project": "from-params"}).train
    with trackers.tracker_environment(cfg, tmp_path / "t"):
        assert os.environ["WANDB_PROJECT"] == "from-params" and os.environ["WANDB_ENTITY"] == "team-from-env"
        assert os.environ["WANDB_DIR"] == str(tmp_path / "t")
    assert os.environ["WANDB_PROJECT"] == "from-env" and "WANDB_DIR" not in os.environ


@pytest.mark.parametrize(
    "train, key",
    [
        ({"report_to": ["wandb"]}, "train.report_to"),
        ({"report_to": ["dvclive", "comet"]}, "train.report_to"),
        ({"wandb_project": "p"}, "train.wandb_project"),
        ({"report_to": ["dvclive", "wandb"], "mlflow_tracking_uri": "file:/x"}, "train.mlflow_tracking_uri"),
        (
            {"report_to": ["dvclive", "wandb", "mlflow"], "wandb_name": "a", "mlflow_run_name": "b"},
            "train.mlflow_run_name",
        ),
    ],
)
def test_contradictions_exit_2_naming_the_key(tmp_path, train, key):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"] |= train
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "reprotune"), "check", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and key in result.stderr + result.stdout, result.stderr + result.stdout

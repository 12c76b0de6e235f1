"""The train stage as a process: exit codes, kill -9 and resume, checkpoint selection, the launcher, DDP."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.torch import load_file

from reprotune import testing as synthetic
from reprotune.config import load_params
from reprotune.io import write_json
from reprotune.model.builtin import build_tiny_llama
from reprotune.train.checkpoints import MARKER, select_resume, write_marker
from reprotune.train.launch import WORKER_ENV, Rendezvous, accelerate_command, processes_to_launch

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_LEN = 128
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# The entry proposed for dvc.yaml; run_stage lets the stage read only the params it declares.
SECTION_KEYS = {
    "quant": [
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
    ],
    "lora": ["r", "alpha", "dropout", "target_linear", "target_modules", "modules_to_save", "use_rslora", "use_dora"],
    "train": list(yaml.safe_load((REPO / "params.yaml").read_text())["train"]),
}
TRAIN_STAGE = {
    "cmd": "python stages/train.py",
    "params": [f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys],
}
TRAIN = 118  # sequences in the train split (the rest are val); they pack into 36 rows
# 12 optimizer steps over the 36 packed rows; a checkpoint every 2 steps, a log every step
RESUMABLE = {
    "max_steps": 12,
    "save_steps": 2,
    "logging_steps": 1,
    "eval_steps": 4,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_llama(out)
    return out


def project(root: Path, tiny: Path, **sections: dict) -> Path:
    """A repo-shaped folder: params.yaml (repo values + `sections`), dvc.yaml, base model, packed data."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"]["sequence_len"] = SEQUENCE_LEN
    for section, values in sections.items():
        params[section].update(values)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": TRAIN_STAGE}}))
    shutil.copytree(REPO / "data/sample", root / "data/sample")  # the params check wants the datasets
    shutil.copytree(REPO / "data/prompts", root / "data/prompts")  # and evaluate.general_prompts
    shutil.copytree(tiny, root / "models/base")
    seqs = sequences()
    synthetic.write_packed_dir(root / "data/packed", {"train": seqs[:TRAIN], "val": seqs[TRAIN:]}, SEQUENCE_LEN, True)
    return root


def sequences():
    return synthetic.sequences(140, seed=0, vocab=4096, max_len=SEQUENCE_LEN, mean_len=40)


def stage(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=root,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def curve(root: Path, name: str) -> list[tuple[int, float]]:
    lines = (root / "dvclive/plots/metrics" / f"{name}.tsv").read_text().split("\n")[1:]
    return [(int(s), float(v)) for s, v in (line.split("\t") for line in lines if line)]


def start_and_kill_after_first_checkpoint(root: Path, env: dict | None = None) -> None:
    """Start the train stage and kill -9 it once a checkpoint is complete, with every process it started
    (accelerate's launcher starts each worker in a session of its own: a process group would miss them)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=root,
        env=env or ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((root / "checkpoints/train").glob(f"checkpoint-*/{MARKER}")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was completed"
        time.sleep(0.01)
    stage_process = psutil.Process(proc.pid)
    processes = [stage_process, *stage_process.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    psutil.wait_procs(processes, timeout=30)


@pytest.mark.parametrize(
    "optimizer",
    [
        "adamw_torch",
        "adamw_bnb_8bit",  # 8-bit: its quantized states resume too
        pytest.param(
            "adamw_torch_8bit",
            marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed"),
        ),
    ],
)
def test_killed_run_resumes_to_the_same_adapter_and_curves(tmp_path, tiny, optimizer):
    killed = project(tmp_path / "killed", tiny, train={**RESUMABLE, "optimizer": optimizer})
    start_and_kill_after_first_checkpoint(killed)
    assert not (killed / "models/adapter").exists()
    ckpts = killed / "checkpoints/train"
    complete = max(int(p.parent.name.split("-")[1]) for p in ckpts.glob(f"checkpoint-*/{MARKER}"))
    assert complete < RESUMABLE["max_steps"]
    # never resumed from: a half-written checkpoint (no marker) and one from other inputs
    (ckpts / "checkpoint-100").mkdir()
    write_json(ckpts / "checkpoint-100/trainer_state.json", {"global_step": 100})
    shutil.copytree(ckpts / f"checkpoint-{complete}", ckpts / "checkpoint-99")
    write_marker(ckpts / "checkpoint-99", "another-run", 99)

    resumed = stage(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = project(tmp_path / "straight", tiny, train={**RESUMABLE, "optimizer": optimizer})
    assert stage(straight).returncode == 0

    m_resumed, m_straight = (json.loads((r / "metrics/train.json").read_text()) for r in (killed, straight))
    assert m_resumed["resumed_from_step"] == complete and m_straight["resumed_from_step"] == 0
    for key in ("steps", "tokens_seen", "supervised_tokens_seen", "train_loss", "eval_loss"):
        assert m_resumed[key] == pytest.approx(m_straight[key], abs=1e-6), key
    for name in ("train/loss", "eval/loss", "train/learning_rate"):
        a, b = curve(killed, name), curve(straight, name)
        assert [s for s, _ in a] == [s for s, _ in b]
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-6)
    w_resumed, w_straight = (load_file(r / "models/adapter/adapter_model.safetensors") for r in (killed, straight))
    assert w_resumed.keys() == w_straight.keys()
    assert all(np.array_equal(w_resumed[k].numpy(), w_straight[k].numpy()) for k in w_straight)
    assert not ckpts.exists()


def test_loss_watchdog_exits_1_with_its_message(tmp_path, tiny):
    root = project(
        tmp_path / "p",
        tiny,
        quant={"load_in_4bit": False},
        train={**RESUMABLE, "loss_watchdog_threshold": 1.0, "loss_watchdog_patience": 2},
    )
    result = stage(root)
    assert result.returncode == 1
    assert "loss watchdog: training loss stayed above train.loss_watchdog_threshold=1" in result.stderr
    assert not (root / "models/adapter").exists() and not (root / "metrics/train.json").exists()


def test_missing_packed_data_exits_2(tmp_path, tiny):
    root = project(tmp_path / "p", tiny)
    shutil.rmtree(root / "data/packed")
    result = stage(root)
    assert result.returncode == 2 and "run the tokenize stage first" in result.stderr


def test_only_complete_checkpoints_of_this_run_are_resumed_and_the_rest_pruned(tmp_path):
    def checkpoint(step: int, fp: str | None, marker_step: int | None = None) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if fp:
            write_marker(path, fp, step if marker_step is None else marker_step)
        return path

    good = [checkpoint(2, "fp"), checkpoint(4, "fp")]
    checkpoint(6, None)  # half-written: the Trainer was killed while saving it
    checkpoint(8, "other")  # written by a run with other params or data
    checkpoint(10, "fp", marker_step=2)  # a marker copied from elsewhere
    assert select_resume(tmp_path, "fp", prune=False) == good[-1]
    assert len(list(tmp_path.iterdir())) == 5
    assert select_resume(tmp_path, "fp", prune=True) == good[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert select_resume(tmp_path, "nothing-matches", prune=True) is None and not list(tmp_path.iterdir())


def test_launcher_choice(monkeypatch):
    monkeypatch.delenv(WORKER_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this host's view: no GPU
    defaults = load_params(REPO / "params.yaml").train

    def launcher(name: str):
        return dataclasses.replace(defaults, launcher=name)

    assert processes_to_launch(launcher("python")) == 0
    assert processes_to_launch(launcher("auto")) == 0  # fewer than two GPUs: in-process
    assert processes_to_launch(launcher("accelerate")) == 1
    monkeypatch.setenv("REPROTUNE_NUM_PROCESSES", "2")
    assert processes_to_launch(launcher("accelerate")) == 2
    monkeypatch.setenv(WORKER_ENV, "1")  # the relaunched stage trains
    assert processes_to_launch(launcher("accelerate")) == 0
    here = Rendezvous(1, 0, "127.0.0.1", 1234)
    two, one = accelerate_command(2, "stages/train.py", here), accelerate_command(1, "stages/train.py", here)
    assert "--multi_gpu" in two and "--multi_gpu" not in one
    assert two[-1] == "stages/train.py" and two[two.index("--num_processes") + 1] == "2"


def test_two_process_ddp_on_cpu_trains_an_adapter(tmp_path, tiny):
    one_epoch = {**RESUMABLE, "max_steps": -1, "num_epochs": 1, "launcher": "accelerate"}
    root = project(tmp_path / "p", tiny, train=one_epoch)
    result = stage(root, env={**ENV, "REPROTUNE_NUM_PROCESSES": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((root / "metrics/train.json").read_text())
    rows = json.loads((root / "data/packed/manifest.json").read_text())["splits"]["train"]["rows"]
    assert metrics["world_size"] == 2 and rows % 4 == 0  # 2 processes x 2 rows: no row repeated to even out
    # one epoch split between the two processes, counted over both: every labelled token once
    seqs = sequences()[:TRAIN]
    assert metrics["supervised_tokens_seen"] == sum(int((lab[1:] != -100).sum()) for _, lab in seqs)
    assert metrics["steps"] == math.ceil(rows // 4 / RESUMABLE["gradient_accumulation_steps"])
    assert (root / "models/adapter/adapter_model.safetensors").is_file()

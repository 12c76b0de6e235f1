"""Several processes on one CPU host over gloo: FSDP really shards the base, DDP and FSDP train as one process
would with the same global batch, a killed FSDP run resumes, and what cannot run is refused with exit 2.

The one-process reference accumulates twice as many micro-batches as each of the two processes, so every
optimizer step sees the same rows (accelerate hands micro-batches to the processes in turn)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from test_train_stage import ENV, REPO, RESUMABLE, curve, project, stage, start_and_kill_after_first_checkpoint

from reprotune.config import load_params
from reprotune.errors import BadInput
from reprotune.model.builtin import build_tiny_llama
from reprotune.train import launch, sharding

# LoRA on the full-precision base (bitsandbytes shards 4-bit weights on CUDA only), adapters only (the
# practitioner's setup on a pretrained base) and no dropout (each process draws its own dropout masks, so
# with dropout the runs differ by their random streams, not by how they share the work); 8 steps, a log each
SHARED = {**RESUMABLE, "max_steps": 8, "save_steps": 4, "eval_steps": 4, "launcher": "accelerate"}
PER_PROCESS = {**SHARED, "gradient_accumulation_steps": 1}
ONE_PROCESS = {**SHARED, "gradient_accumulation_steps": 2}
FULL_PRECISION = {"load_in_4bit": False}
ADAPTERS_ONLY = {"modules_to_save": None, "dropout": 0.0}
TWO = {**ENV, launch.PROCESSES_ENV: "2"}
ONE = {**ENV, launch.PROCESSES_ENV: "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_llama(out)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny) -> Path:
    """The reference: one process, the same global batch."""
    root = project(
        tmp_path_factory.mktemp("one") / "p", tiny, train=ONE_PROCESS, quant=FULL_PRECISION, lora=ADAPTERS_ONLY
    )
    result = stage(root, env=ONE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def metrics(root: Path) -> dict:
    return json.loads((root / "metrics/train.json").read_text())


def assert_same_training(root: Path, reference: Path, rtol: float) -> tuple[float, float]:
    """Per-step losses within `rtol` of the reference's; the adapters alike in layout and close in value.
    Returns the largest relative loss difference and the largest adapter weight difference."""
    a, b = curve(root, "train/loss"), curve(reference, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, SHARED["max_steps"] + 1))
    got, want = np.array([v for _, v in a]), np.array([v for _, v in b])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    w, w_ref = (load_file(r / "models/adapter/adapter_model.safetensors") for r in (root, reference))
    assert w.keys() == w_ref.keys() and all(w[k].shape == w_ref[k].shape for k in w)
    for k in w:
        np.testing.assert_allclose(w[k].numpy(), w_ref[k].numpy(), rtol=0, atol=1e-4, err_msg=k)
    files = sorted(p.name for p in (root / "models/adapter").iterdir())
    assert files == sorted(p.name for p in (reference / "models/adapter").iterdir())
    weights = max(float((w[k] - w_ref[k]).abs().max()) for k in w)
    return float(np.max(np.abs(got - want) / np.abs(want))), weights


@pytest.mark.parametrize("distributed, share", [("fsdp", 0.5), ("ddp", 1.0)])
def test_two_processes_train_as_one(tmp_path, tiny, one_process, distributed, share):
    """FSDP really shards (half the base per process); FSDP and DDP both equal one process."""
    root = project(
        tmp_path / "p",
        tiny,
        train={**PER_PROCESS, "distributed": distributed},
        quant=FULL_PRECISION,
        lora=ADAPTERS_ONLY,
    )
    result = stage(root, env=TWO)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(root)
    # read from the wrapped model: DTensor shards under FSDP (not a DistributedDataParallel), DDP's wrapper else
    assert m["distributed"] == distributed and m["world_size"] == 2
    assert m["local_parameter_share"] == pytest.approx(share, abs=0.02)
    assert metrics(one_process)["distributed"] == "none" and metrics(one_process)["local_parameter_share"] == 1.0
    loss, weights = assert_same_training(root, one_process, rtol=1e-4)
    print(f"{distributed} x2 against one process: per-step loss {loss:.1e} relative, adapter {weights:.1e} at most")
    # one ordinary peft folder: peft loads it onto the base, and it changes the base's output
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "models/base", dtype=torch.float32)
    ids = torch.arange(1, 33)[None]
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, root / "models/adapter")
    assert not torch.allclose(tuned(ids).logits, before)


def test_killed_fsdp_run_resumes_to_the_same_adapter(tmp_path, tiny):
    settings = {
        "train": {**PER_PROCESS, "distributed": "fsdp", "save_steps": 2},
        "quant": FULL_PRECISION,
        "lora": ADAPTERS_ONLY,
    }
    killed = project(tmp_path / "killed", tiny, **settings)
    start_and_kill_after_first_checkpoint(killed, env=TWO)  # the stage, accelerate and both workers
    assert not (killed / "models/adapter").exists()

    resumed = stage(killed, env=TWO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = project(tmp_path / "straight", tiny, **settings)
    assert stage(straight, env=TWO).returncode == 0
    assert metrics(killed)["resumed_from_step"] >= 2, resumed.stderr[-5000:]
    assert metrics(straight)["resumed_from_step"] == 0
    for name in ("train/loss", "train/learning_rate"):
        a, b = curve(killed, name), curve(straight, name)
        assert [s for s, _ in a] == [s for s, _ in b]
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=0, atol=1e-6)
    w_resumed, w_straight = (load_file(r / "models/adapter/adapter_model.safetensors") for r in (killed, straight))
    assert w_resumed.keys() == w_straight.keys()
    for k in w_straight:
        np.testing.assert_allclose(w_resumed[k].numpy(), w_straight[k].numpy(), rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"lora": ADAPTERS_ONLY}, "train.distributed: fsdp with quant.load_in_4bit: true needs CUDA"),  # QLoRA
        ({"quant": FULL_PRECISION}, "lora.modules_to_save ['embed_tokens', 'lm_head'] under train.distributed: fsdp"),
    ],
)
def test_what_fsdp_cannot_run_on_cpu_is_refused_before_loading(tmp_path, tiny, sections, message):
    root = project(tmp_path / "p", tiny, train={**PER_PROCESS, "distributed": "fsdp"}, **sections)
    result = stage(root, env=TWO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "train.distributed: ddp" in result.stderr  # what works instead
    assert not (root / "models/adapter").exists()


def params_with(**train):
    params = load_params(REPO / "params.yaml")
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))


def test_several_machines_are_passed_to_accelerate(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    two = params_with(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29555).train
    where = launch.Rendezvous.of(two)
    command = launch.accelerate_command(4, "stages/train.py", where)
    assert command[command.index("--num_processes") + 1] == "8"  # accelerate counts all machines' processes
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "10.0.0.1"),
                        ("--main_process_port", "29555")):  # fmt: skip
        assert command[command.index(flag) + 1] == value
    # the environment torchrun reads stands in for null keys
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.2")
    monkeypatch.setenv("MASTER_PORT", "29600")
    monkeypatch.setenv("NODE_RANK", "1")
    from_env = launch.Rendezvous.of(params_with(num_machines=2).train)
    assert (from_env.ip, from_env.port, from_env.machine_rank) == ("10.0.0.2", 29600, 1)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(BadInput, match="train.main_process_ip"):
        launch.Rendezvous.of(params_with(num_machines=2).train)
    # several machines start accelerate even with one GPU or none
    monkeypatch.delenv(launch.WORKER_ENV, raising=False)
    assert launch.processes_to_launch(params_with(launcher="auto").train) == 0
    assert launch.processes_to_launch(params_with(launcher="auto", num_machines=2).train) >= 1


def test_two_machines_of_one_process_each_on_one_host(tmp_path, tiny):
    """Two "machines" on 127.0.0.1, one process each, FSDP over both: rank 0's folder gets the adapter."""
    port = launch._free_port()
    machines = {"num_machines": 2, "main_process_ip": "127.0.0.1", "main_process_port": port}
    roots = [
        project(tmp_path / f"m{rank}", tiny, train={**PER_PROCESS, "distributed": "fsdp", **machines},
                quant=FULL_PRECISION, lora=ADAPTERS_ONLY)
        for rank in (0, 1)
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "stages/train.py")],
            cwd=root,
            env={**ONE, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, root in enumerate(roots)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    m = metrics(roots[0])
    assert m["world_size"] == 2 and m["distributed"] == "fsdp"
    assert m["local_parameter_share"] == pytest.approx(0.5, abs=0.02)
    assert (roots[0] / "models/adapter/adapter_model.safetensors").is_file()
    assert not (roots[1] / "models/adapter").exists()  # the other machine only helped


def test_layer_class_is_found_or_named(tiny):
    cfg = params_with().train.fsdp
    cls, names = sharding.layer_class(tiny, cfg, trust_remote_code=False)
    config = yaml.safe_load((tiny / "config.json").read_text())
    assert cls == "LlamaDecoderLayer" and len(names) == config["num_hidden_layers"]
    with pytest.raises(BadInput, match="train.fsdp.transformer_layer_cls_to_wrap.*LlamaDecoderLayer"):
        sharding.layer_class(tiny, dataclasses.replace(cfg, transformer_layer_cls_to_wrap="Block"), False)
    plan = sharding.load_config(cfg, names, 2).fsdp_plan
    assert plan == {"model.layers.*": "free_full_weight"}
    arguments = sharding.trainer_arguments(cfg, cls)
    assert arguments["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]

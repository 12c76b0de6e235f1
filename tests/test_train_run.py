"""The train core in-process: outputs, counters, determinism, both batch layouts, guards, optimizers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from reprotune import testing as synthetic
from reprotune.io import sha256_tree
from reprotune.packed import IGNORE_INDEX
from reprotune.stage import RUNTIME_KEYS, execute
from reprotune.train import run as run_module
from reprotune.train.errors import TrainingStopped
from reprotune.train.run import TrainInputs

from helpers import SHIPPED, params_with

REPO = Path(__file__).resolve().parents[1]
NEEDS_TORCHAO = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed (the lowbit extra)"
)
PARAMS = SHIPPED
SEQUENCE_LEN = 128
# 5 optimizer steps of 2 rows x 2 micro-batches over ~20 packed rows: one epoch, checked below
FAST = {
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": -1,
    "num_epochs": 1,
    "save_steps": 2,
    "eval_steps": 2,
    "logging_steps": 2,
    "warmup_ratio": 0.1,
}


def train(params, root: Path) -> dict | None:
    """The train stage's core in the folder `root`, through the stage doorway (outputs and metrics)."""
    return execute(
        run_module.train,
        params,
        TrainInputs.under(root),
        out=root / "models/adapter",
        metrics=root / "metrics/train.json",
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def seqs():
    return synthetic.sequences(70, seed=0, vocab=4096, max_len=SEQUENCE_LEN, mean_len=40)


def project(root: Path, tiny: Path, seqs, packed: bool = True) -> Path:
    shutil.copytree(tiny, root / "models/base")
    synthetic.write_packed_dir(root / "data/packed", {"train": seqs[:60], "val": seqs[60:]}, SEQUENCE_LEN, packed)
    return root


def supervised(seqs) -> int:
    return sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in seqs)


def curve(root: Path, name: str) -> list[tuple[int, float]]:
    lines = (root / "dvclive/plots/metrics" / f"{name}.tsv").read_text().split("\n")[1:]
    return [(int(s), float(v)) for s, v in (line.split("\t") for line in lines if line)]


def test_qlora_run_writes_outputs_counts_tokens_and_repeats_exactly(tmp_path, tiny, seqs):
    params = params_with(train=FAST)
    roots = [project(tmp_path / name, tiny, seqs) for name in ("a", "b")]
    metrics = [train(params, root) for root in roots]

    a, m = roots[0], metrics[0]
    assert m["steps"] == 5 and m["device"] == "cpu" and m["compute_dtype"] == "float32"
    assert m["attn_implementation"] == "sdpa_packed"  # sdpa per sequence: no dense mask over the row
    assert m["supervised_tokens_seen"] == supervised(seqs[:60])  # one epoch, every labelled token once
    assert m["tokens_seen"] == sum(len(ids) for ids, _ in seqs[:60])
    assert m["supervised_tokens_per_second"] > 0 and m["peak_memory_kind"] == "rss"
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])
    assert json.loads((a / "metrics/train.json").read_text()) == {k: v for k, v in m.items() if k not in RUNTIME_KEYS}

    adapter = a / "models/adapter"
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_config.json",
    } <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "training_config.json").read_text())
    assert config["params"]["quant.load_in_4bit"] is True and config["hardware"]["attn_implementation"] == "sdpa"
    assert not (a / "checkpoints/train").exists()  # removed once the adapter is written

    losses = curve(a, "train/loss")
    # every logging_steps, and at the last step whatever the cadence
    assert [s for s, _ in losses] == [2, 4, 5] and [s for s, _ in curve(a, "eval/loss")] == [2, 4, 5]
    assert losses[-1][1] == m["train_loss"]
    # same inputs, same machine: the same losses and adapter, bit for bit
    assert curve(roots[1], "train/loss") == losses and metrics[1]["eval_loss"] == m["eval_loss"]
    assert sha256_tree(adapter) == sha256_tree(roots[1] / "models/adapter")  # byte-identical: one DVC hash


def test_padded_batches_when_packing_is_off(tmp_path, tiny, seqs):
    root = project(tmp_path, tiny, seqs, packed=False)
    m = train(params_with(quant={"load_in_4bit": False}, train=FAST), root)
    assert m["steps"] == 15  # 60 rows of one sequence each, 2 rows x 2 micro-batches per step
    assert m["attn_implementation"] == "sdpa"
    # one epoch: every token once, the padding of each micro-batch not counted
    assert m["tokens_seen"] == sum(len(ids) for ids, _ in seqs[:60])
    assert m["supervised_tokens_seen"] == supervised(seqs[:60])


def test_non_finite_loss_stops_before_any_output(tmp_path, tiny, seqs, monkeypatch):
    def poisoned(*args, **kwargs):
        model = load(*args, **kwargs)
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        return model

    load = run_module.load_trainable
    monkeypatch.setattr(run_module, "load_trainable", poisoned)
    root = project(tmp_path, tiny, seqs)
    with pytest.raises(TrainingStopped, match=r"non-finite loss .* at optimizer step 1; stopped before"):
        train(params_with(quant={"load_in_4bit": False}, train=FAST), root)
    assert not (root / "models/adapter").exists() and not (root / "metrics/train.json").exists()


def test_loss_watchdog_stops_after_patience_logs_above_threshold(tmp_path, tiny, seqs):
    root = project(tmp_path, tiny, seqs)
    params = params_with(
        quant={"load_in_4bit": False}, train={**FAST, "loss_watchdog_threshold": 1.0, "loss_watchdog_patience": 2}
    )
    with pytest.raises(
        TrainingStopped,
        match=r"above train.loss_watchdog_threshold=1 for 2 consecutive "
        r"logs \(8\.\d+, 8\.\d+\) up to step 4",
    ):
        train(params, root)
    assert not (root / "models/adapter").exists()


@pytest.mark.parametrize("ratio, steps, expected", [(0.05, None, 1), (1.0, None, 10), (None, 3, 3), (None, None, 0)])
def test_warmup_from_ratio_or_steps(ratio, steps, expected):
    cfg = dataclasses.replace(PARAMS.train, warmup_ratio=ratio, warmup_steps=steps)
    args = run_module.training_arguments(cfg, run_module.capabilities(PARAMS), Path("unused"), False, True)
    assert args.get_warmup_steps(10) == expected


@pytest.mark.parametrize(
    "optimizer, kind",
    [
        ("adamw_torch", ("torch", 32, False)),
        ("adamw_bnb_8bit", ("bitsandbytes", 8, False)),
        ("paged_adamw_8bit", ("bitsandbytes", 8, True)),
        ("paged_adamw_32bit", ("bitsandbytes", 32, True)),
        ("adamw_torch_fused", ("torch", 32, False)),
        pytest.param("adamw_torch_8bit", ("torchao", 32, False), marks=NEEDS_TORCHAO),
        pytest.param("adamw_torch_4bit", ("torchao", 32, False), marks=NEEDS_TORCHAO),
    ],
)
def test_optimizer_choice(tmp_path, tiny, seqs, optimizer, kind):
    """Each of Axolotl's usual optimizers is the Trainer's, from its library, and takes a step on CPU."""
    root = project(tmp_path, tiny, seqs)
    params = params_with(quant={"load_in_4bit": False}, train={**FAST, "optimizer": optimizer})
    caps = run_module.capabilities(params)
    model = run_module.load_trainable(root / "models/base", params.quant, params.lora, params.train, caps, "sdpa")
    args = run_module.training_arguments(params.train, caps, tmp_path / "ckpt", False, True)
    rows = run_module.PackedRows(root / "data/packed", "train")
    trainer = run_module._trainer(model, args, rows, None, True, params.train, "fp", root / "dvclive")
    opt = trainer.create_optimizer()
    bnb_args = getattr(opt, "args", None)
    got = (type(opt).__module__.split(".")[0], getattr(bnb_args, "optim_bits", 32), getattr(opt, "is_paged", False))
    assert got == kind
    if kind[0] == "torchao":  # its classes say the bits: AdamW8bit, AdamW4bit
        assert type(opt).__name__ == "AdamW" + optimizer.removeprefix("adamw_torch_")
    assert bool(opt.defaults.get("fused")) == optimizer.endswith("_fused")
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    batch = next(iter(trainer.get_train_dataloader()))
    model(**batch).loss.backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p.detach(), lora[n])]
    assert len(moved) == len(lora) > 0


def test_adam_hyperparameters_reach_the_optimizer(tmp_path, tiny, seqs):
    root = project(tmp_path, tiny, seqs)
    train_cfg = {**FAST, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "eval_batch_size": 5}
    params = params_with(quant={"load_in_4bit": False}, train=train_cfg)
    caps = run_module.capabilities(params)
    model = run_module.load_trainable(root / "models/base", params.quant, params.lora, params.train, caps, "sdpa")
    args = run_module.training_arguments(params.train, caps, tmp_path / "ckpt", True, True)
    assert args.per_device_eval_batch_size == 5 and args.per_device_train_batch_size == 2
    rows, val = (run_module.PackedRows(root / "data/packed", split) for split in ("train", "val"))
    trainer = run_module._trainer(model, args, rows, val, True, params.train, "fp", root / "dvclive")
    opt = trainer.create_optimizer()
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.8, 0.95), 1e-6)


def test_an_optimizer_whose_package_is_missing_exits_2_before_loading(tmp_path, monkeypatch):
    import importlib.util

    from reprotune.errors import BadInput

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(BadInput, match=r"train.optimizer: adamw_torch_8bit needs the torchao package.*\[lowbit\]"):
        run_module.train(params_with(train={"optimizer": "adamw_torch_8bit"}), TrainInputs.under(tmp_path), tmp_path)


@pytest.mark.parametrize(
    "scheduler, floor, first_after_warmup, last",
    [
        ("cosine", 0.1, 1.0, 0.1),  # Axolotl's cosine_min_lr_ratio: (1 - r) * cosine + r
        ("cosine", None, 1.0, 0.0),
        ("constant_with_warmup", None, 1.0, 1.0),
        ("polynomial", None, 1.0, 1e-7 / 1e-3),  # the Trainer's: power 1 down to 1e-7
    ],
)
def test_schedules(scheduler, floor, first_after_warmup, last):
    import torch

    cfg = dataclasses.replace(
        PARAMS.train,
        lr_scheduler=scheduler,
        cosine_min_lr_ratio=floor,
        learning_rate=1e-3,
        warmup_ratio=None,
        warmup_steps=2,
    )
    args = run_module.training_arguments(cfg, run_module.capabilities(PARAMS), Path("unused"), False, True)
    from transformers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler(
        args.lr_scheduler_type,
        opt,
        num_warmup_steps=2,
        num_training_steps=10,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(10):
        rates.append(sched.get_last_lr()[0] / 1e-3)
        opt.step()
        sched.step()
    rates.append(sched.get_last_lr()[0] / 1e-3)
    assert rates[0] == 0 and rates[2] == pytest.approx(first_after_warmup)
    assert rates[-1] == pytest.approx(last, abs=1e-9)


def test_loss_watchdog_needs_consecutive_logs_and_survives_a_resume():
    from types import SimpleNamespace

    from reprotune.train.callbacks import LossWatchdog

    dog, state = LossWatchdog(threshold=12.0, patience=3), SimpleNamespace(global_step=0)
    for loss in (13.0, 12.5, 11.0, 13.0, 14.0):  # the dip below 12 restarts the count
        state.global_step += 1
        dog.on_log(None, state, None, logs={"loss": loss})
    dog.on_log(None, state, None, logs={"eval_loss": 20.0})  # only training losses count
    restored = LossWatchdog.from_state(dog.state())  # as restored from a checkpoint
    with pytest.raises(TrainingStopped, match=r"3 consecutive logs \(13, 14, 15\) up to step 5"):
        restored.on_log(None, state, None, logs={"loss": 15.0})


def test_per_epoch_intervals_become_steps_from_the_packed_split():
    """Axolotl's evals_per_epoch / saves_per_epoch: 201 rows, micro batch 2, accumulation 2 -> 101
    micro-batches -> 51 optimizer steps per epoch (as the Trainer counts them: the last, partial
    accumulation is a step); 4 evals per epoch -> every ceil(51 / 4) = 13 steps, as Axolotl's
    eval_steps = 1 / (evals_per_epoch x epochs) of max_steps gives."""
    from reprotune.train.run import per_epoch_intervals

    cfg = dataclasses.replace(
        SHIPPED.train, micro_batch_size=2, gradient_accumulation_steps=2, eval_steps=None, evals_per_epoch=4,
        save_steps=None, saves_per_epoch=1,
    )  # fmt: skip
    resolved = per_epoch_intervals(cfg, train_rows=201, world_size=1)
    assert (resolved.eval_steps, resolved.save_steps) == (13, 51)
    assert per_epoch_intervals(cfg, train_rows=201, world_size=2).eval_steps == 7  # 51 micro-batches, 26 steps
    assert per_epoch_intervals(SHIPPED.train, train_rows=201, world_size=1) == SHIPPED.train  # steps given: kept


def test_early_stopping_keeps_the_best_adapter(tmp_path, tiny, seqs, monkeypatch):
    """Too large a step makes the validation loss rise: training stops after `patience` evaluations
    without a lower one, and the adapter is the best evaluation's, the same as a run stopped there; a run
    killed after the stop, before its adapter was written, comes to the same stop when rerun."""
    steady = {**FAST, "lr_scheduler": "constant", "warmup_ratio": None, "learning_rate": 0.05, "num_epochs": 3}
    # save_steps 3: the stage checkpoints at every evaluation anyway, so the best one can be kept
    steady |= {"eval_steps": 1, "save_steps": 3, "logging_steps": 1, "loss_watchdog_threshold": None}
    params = params_with(quant={"load_in_4bit": False}, train={**steady, "early_stopping_patience": 2})
    stopped = train(params, project(tmp_path / "stopped", tiny, seqs))["early_stopping"]
    planned = 3 * math.ceil(len(run_module.PackedRows(tmp_path / "stopped/data/packed", "train")) / (2 * 2))
    assert stopped["stopped_early"] and stopped["last_step"] == stopped["best_step"] + 2 < planned
    assert stopped["adapter_step"] == stopped["best_step"]
    at_best = params_with(quant={"load_in_4bit": False}, train={**steady, "max_steps": stopped["best_step"]})
    train(at_best, project(tmp_path / "at_best", tiny, seqs))
    killed = project(tmp_path / "killed", tiny, seqs)
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "save_adapter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train(params, killed)
    rerun = train(params, killed)
    assert 0 < rerun["resumed_from_step"] < stopped["last_step"] and rerun["early_stopping"] == stopped
    runs = ("stopped", "at_best", "killed")
    weights = [(tmp_path / run / "models/adapter/adapter_model.safetensors").read_bytes() for run in runs]
    assert weights[0] == weights[1] == weights[2]

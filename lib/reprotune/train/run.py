"""The train core: models/base + data/packed -> the adapter folder, with curves in dvclive/.

Under DDP every process runs this; only the main process saves the adapter and returns metrics.
Resumable checkpoints live in checkpoints/train/ (see the package docstring) and are deleted once
the adapter is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from reprotune import layout
from reprotune.config import Params
from reprotune.config.sections import SECTION_TYPES, TrainConfig
from reprotune.errors import BadInput
from reprotune.hardware import Capabilities, peak_rss_bytes, resolve
from reprotune.io import write_json
from reprotune.loading import copy_tokenizer_files
from reprotune.packed import PackedRows, read_manifest, split_files
from reprotune.quant import compute_dtype_setting
from reprotune.train import attention, launch, sharding, trackers
from reprotune.train.batches import PaddedCollator, collate_padding_free
from reprotune.train.checkpoints import fingerprint, select_resume, step_of
from reprotune.train.model import load_trainable

SECTIONS = ("quant", "lora", "train")  # the sections this stage reads, whole (see its dvc.yaml entry)
# transformers' "constant" ignores warmup; "constant_with_warmup" with 0 warmup steps is the same
SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",
    "constant_with_warmup": "constant_with_warmup",
    "polynomial": "polynomial",
}
# optimizers whose states another package keeps, and the extra that installs it
OPTIMIZER_PACKAGES = {"adamw_torch_8bit": ("torchao", "lowbit"), "adamw_torch_4bit": ("torchao", "lowbit")}
# padded positions are masked out and carry label -100, so any valid id will do
PAD_ID = 0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    base: Path = layout.BASE
    packed: Path = layout.PACKED
    checkpoints: Path = layout.CHECKPOINTS
    """Resumable checkpoints (read and written; outside DVC)."""
    dvclive: Path = layout.DVCLIVE
    """Per-step curves (written as training goes)."""
    trackers: Path = layout.TRACKERS
    """Local files of the trackers in train.report_to (outside DVC; see trackers.py)."""

    @classmethod
    def under(cls, root: Path) -> TrainInputs:
        """The pipeline's paths inside the repo (or test folder) `root`."""
        return cls(*(Path(root) / getattr(cls(), f.name) for f in dataclasses.fields(cls)))


def params_read(params: Params) -> dict:
    """Every key of the sections this stage reads that shapes the adapter, dotted (quant.load_in_4bit, ...):
    tracker keys say where the run is reported and rendezvous keys where its machines meet, so they are left
    out. Read key by key: a stage may declare single keys, and then a section is a restricted view, not a
    dataclass."""
    return {
        f"{s}.{f.name}": _plain(getattr(getattr(params, s), f.name))
        for s in SECTIONS
        for f in dataclasses.fields(SECTION_TYPES[s])
        if not (s == "train" and (f.name in trackers.KEYS or f.name in launch.RENDEZVOUS_KEYS))
    }


def _plain(value):
    """A nested section (train.fsdp) as the mapping params.yaml holds; other values as they are."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def capabilities(params: Params) -> Capabilities:
    t, q = params.train, params.quant
    return resolve(t.bf16, t.fp16, t.attn_implementation, compute_dtype_setting(q))


def train(params: Params, inputs: TrainInputs, out_dir: Path) -> dict | None:
    """Train (resuming from a matching complete checkpoint) and save the adapter into `out_dir`;
    returns the metrics on the main process, None on the others."""
    require_optimizer(params.train.optimizer)
    trackers.require_trackers(params.train.report_to)
    manifest = read_manifest(inputs.packed)  # bad data is reported before torch is even imported
    train_rows = PackedRows(inputs.packed, "train")
    val_rows = PackedRows(inputs.packed, "val") if split_files(inputs.packed, "val") else None
    caps = capabilities(params)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = per_epoch_intervals(params.train, len(train_rows), world_size)
    shard = _sharding(params, inputs.base, caps, world_size)
    args = training_arguments(
        cfg, caps, inputs.checkpoints, has_val=val_rows is not None, packed=manifest["packed"], sharding=shard.arguments
    )

    read = params_read(params)
    run = {
        "world_size": args.world_size,
        "device": caps.device,
        "compute_dtype": caps.compute_dtype,
        "attn_implementation": attention.effective(caps.attn_implementation, manifest["packed"]),
        "distributed": shard.mode,
        "eval_steps": cfg.eval_steps,
        "save_steps": cfg.save_steps,
    }
    fp = fingerprint(read, inputs.packed, inputs.base, run)
    with args.main_process_first(local=False, desc="checkpoint selection"):
        resume = select_resume(inputs.checkpoints, fp, prune=args.process_index == 0)
    if resume:
        log.info("resuming from %s", resume)

    model = load_trainable(
        inputs.base, params.quant, params.lora, params.train, caps, run["attn_implementation"],
        sharded=shard.mode == "fsdp", distributed_config=shard.load_config,
    )  # fmt: skip
    with trackers.tracker_environment(params.train, inputs.trackers):  # read as the callbacks are made
        trainer = _trainer(model, args, train_rows, val_rows, manifest["packed"], cfg, fp, inputs.dvclive)
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    ran = sharding.describe(trainer.model_wrapped)
    adapter = sharding.adapter_state(trainer.model) if ran["distributed"] == "fsdp" else None  # all processes
    if not trainer.is_world_process_zero():
        return None
    metrics = {**_metrics(trainer, out.metrics, resume), **peak_memory(caps), **run, **ran}
    save_adapter(
        trainer.model,
        inputs.base,
        out_dir,
        {
            "params": read,
            "hardware": caps.as_dict(),
            "run": run,
            "data": {k: manifest[k] for k in ("sequence_len", "packed")},
        },
        state_dict=adapter,
    )
    # a finished run's checkpoints must go: a rerun with the same inputs would resume at the last
    # step and train nothing
    shutil.rmtree(inputs.checkpoints, ignore_errors=True)
    return metrics


@dataclass(frozen=True)
class Sharding:
    """How this run's processes share the model (sharding.py): the mode, the Trainer's arguments for it and,
    where transformers shards the base while loading (FSDP on CPU), its DistributedConfig."""

    mode: str
    arguments: dict
    load_config: object | None = None


def _sharding(params: Params, base_dir: Path, caps: Capabilities, world_size: int) -> Sharding:
    how = sharding.mode(params.train, world_size)
    if how != "fsdp":
        return Sharding(how, {})
    sharding.require_shardable(params.quant, params.lora, caps.device)
    fsdp = params.train.fsdp
    layer_cls, layer_names = sharding.layer_class(base_dir, fsdp, trust_remote_code=False)
    if caps.device == "cuda":
        return Sharding(how, sharding.trainer_arguments(fsdp, layer_cls))
    # transformers checkpoints only the model of a base it sharded (its optimizer state could be sharded
    # too); GuardedTrainer adds the replicated adapter's optimizer, scheduler and RNG states back
    # no FSDP wrapper runs on CPU to recompute activations: fsdp.activation_checkpointing is transformers' own
    recompute = params.train.gradient_checkpointing or fsdp.activation_checkpointing
    arguments = {"save_only_model": True, "activation_checkpointing": recompute}
    return Sharding(how, arguments, sharding.load_config(fsdp, layer_names, world_size))


def require_optimizer(name: str) -> None:
    """An optimizer whose package is missing is a clear error (exit 2) before any model is loaded."""
    import importlib.util

    package, extra = OPTIMIZER_PACKAGES.get(name, (None, None))
    if package and importlib.util.find_spec(package) is None:
        raise BadInput(
            f"train.optimizer: {name} needs the {package} package, which is not installed; "
            f"pip install -c constraints.txt -e '.[{extra}]' (or choose adamw_bnb_8bit: 8-bit states from bitsandbytes)"
        )


def per_epoch_intervals(cfg: TrainConfig, train_rows: int, world_size: int) -> TrainConfig:
    """`cfg` with eval_steps and save_steps in steps: Axolotl's evals_per_epoch / saves_per_epoch are
    turned into steps from the packed train split, as the Trainer counts an epoch's optimizer steps. With
    early stopping, save_steps is eval_steps: the Trainer keeps the best evaluation's adapter only if a
    checkpoint was written at that step (checkpoints change no weight)."""
    micro_batches = math.ceil(train_rows / (cfg.micro_batch_size * world_size))
    # the Trainer's count: a last, partial accumulation is a step of its own
    steps_per_epoch = max(1, math.ceil(micro_batches / cfg.gradient_accumulation_steps))
    every = {}
    for steps, per_epoch in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
        if getattr(cfg, per_epoch) is not None:  # rounded up, as Axolotl's fraction of max_steps is
            every[steps] = max(1, math.ceil(steps_per_epoch / getattr(cfg, per_epoch)))
    # a stage may declare the section key by key, and then `cfg` is a read-only view: copy it out
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)} | every
    if cfg.early_stopping_patience:  # a checkpoint at every evaluation, so the best one is there to keep
        fields["save_steps"] = fields["eval_steps"]
    return TrainConfig(**fields)


def training_arguments(
    cfg: TrainConfig, caps: Capabilities, out_dir: Path, has_val: bool, packed: bool, sharding: dict | None = None
):
    """The Trainer's arguments; `sharding` (Sharding.arguments) adds or overrides the FSDP ones."""
    from transformers import TrainingArguments

    return TrainingArguments(**(_arguments(cfg, caps, out_dir, has_val, packed) | (sharding or {})))


def _arguments(cfg: TrainConfig, caps: Capabilities, out_dir: Path, has_val: bool, packed: bool) -> dict:
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        **_schedule(cfg),
        warmup_steps=_warmup(cfg),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=caps.bf16,
        fp16=caps.fp16,
        use_cpu=caps.device == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        prediction_loss_only=True,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # the guard raises on a non-finite loss; never hide one in the logs
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the newest may be half-written when killed; the one before is complete
        # early stopping, as Axolotl runs it: on the validation loss, and the best checkpoint's adapter is kept
        # (the Trainer's rotation keeps the best checkpoint and the newest)
        metric_for_best_model="eval_loss" if cfg.early_stopping_patience else None,
        greater_is_better=False if cfg.early_stopping_patience else None,
        load_best_model_at_end=bool(cfg.early_stopping_patience),
        restore_callback_states_from_checkpoint=True,
        # padding-free rows hold no padding (count them all); padded ones count their attention mask
        include_num_input_tokens_seen="all" if packed else "non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        report_to=trackers.trainer_report_to(cfg),
        run_name=trackers.run_name(cfg),
        disable_tqdm=False,
    )


def _schedule(cfg: TrainConfig) -> dict:
    """The Trainer's scheduler arguments; cosine with a floor is its cosine_with_min_lr (the same curve as
    Axolotl's cosine_min_lr_ratio: (1 - r) * cosine + r)."""
    if cfg.lr_scheduler == "cosine" and cfg.cosine_min_lr_ratio is not None:
        return {
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": cfg.cosine_min_lr_ratio},
        }
    return {"lr_scheduler_type": SCHEDULERS[cfg.lr_scheduler]}


def _warmup(cfg: TrainConfig) -> float:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    # transformers reads a float below 1 as a ratio and anything >= 1 as steps, so a full-length
    # warmup (ratio 1.0) is passed as the largest float below 1
    return min(cfg.warmup_ratio or 0.0, math.nextafter(1.0, 0.0))


def _trainer(model, args, train_rows, val_rows, packed: bool, cfg: TrainConfig, fp: str, dvclive: Path):
    from reprotune.train.callbacks import CheckpointMarker, DvcLiveCurves, LogFinalStep, LossWatchdog, SupervisedTokens
    from reprotune.train.trainer import GuardedTrainer

    if cfg.save_steps % cfg.logging_steps:
        log.warning(
            "train.save_steps (%d) is not a multiple of train.logging_steps (%d): after a resume "
            "the first logged loss averages fewer steps than in an uninterrupted run",
            cfg.save_steps,
            cfg.logging_steps,
        )
    from transformers import EarlyStoppingCallback

    callbacks = [
        LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience),
        *([EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []),
        SupervisedTokens(),
        CheckpointMarker(fp),
        LogFinalStep(),
        DvcLiveCurves(dvclive),
    ]
    return GuardedTrainer(
        supervised_loss=_supervised_loss(model, cfg),
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=val_rows,
        data_collator=collate_padding_free if packed else PaddedCollator(PAD_ID),
        callbacks=callbacks,
    )


def _supervised_loss(model, cfg: TrainConfig):
    """The loss at supervised positions only (train.chunked_cross_entropy), where the model allows it."""
    from reprotune.train.loss import SupervisedLoss, unsupported_by

    if not cfg.chunked_cross_entropy:
        return None
    reason = unsupported_by(model)
    if reason:
        log.warning("train.chunked_cross_entropy: full-vocabulary logits at every position, as %s", reason)
        return None
    return SupervisedLoss(model)


def _metrics(trainer, run_metrics: dict, resume: Path | None) -> dict:
    history = trainer.state.log_history
    counter = trainer.supervised_tokens()
    seconds = run_metrics["train_runtime"]
    return {
        "train_loss": next((e["loss"] for e in reversed(history) if "loss" in e), None),
        "eval_loss": next((e["eval_loss"] for e in reversed(history) if "eval_loss" in e), None),
        "supervised_tokens_per_second": (counter.seen - counter.at_start) / seconds if seconds else None,
        "supervised_tokens_seen": counter.seen,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "steps": trainer.state.global_step,
        "resumed_from_step": step_of(resume) if resume else 0,
        "train_seconds": seconds,
        **_early_stopping(trainer),
    }


def _early_stopping(trainer) -> dict:
    """Where early stopping (if on) stopped, and the step whose adapter was kept."""
    from transformers import EarlyStoppingCallback

    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    if not found:
        return {}
    state = trainer.state
    kept = state.best_model_checkpoint  # loaded at the end: the adapter saved is this checkpoint's
    return {
        "early_stopping": {
            "patience": found[0].early_stopping_patience,
            "stopped_early": found[0].early_stopping_patience_counter >= found[0].early_stopping_patience,
            "best_eval_loss": state.best_metric,
            "best_step": state.best_global_step,
            "adapter_step": step_of(Path(kept)) if kept else state.global_step,
            "last_step": state.global_step,
        }
    }


def peak_memory(caps: Capabilities) -> dict:
    if caps.device == "cuda":
        import torch

        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_kind": "rss"}


def save_adapter(model, base_dir: Path, out_dir: Path, config: dict, state_dict: dict | None = None) -> None:
    """The adapter, the base's tokenizer and training_config.json (`config`) in `out_dir`; `state_dict`: the
    adapter's tensors gathered from a sharded model (sharding.adapter_state), else read from `model`."""
    # peft records the path the base was loaded from; record the pipeline's name for it instead, so
    # the adapter's bytes do not depend on where the repo lives
    model.peft_config["default"].base_model_name_or_path = layout.BASE.as_posix()
    # training never resizes the vocabulary (the base stage grows it for added tokens, and the adapter holds
    # only their trained rows), so whole embedding matrices never belong in the adapter
    model.save_pretrained(out_dir, save_embedding_layers=False, state_dict=state_dict)
    # peft's placeholder model card records the base's load path; training_config.json says more
    (out_dir / "README.md").unlink(missing_ok=True)
    copy_tokenizer_files(base_dir, out_dir)
    write_json(out_dir / "training_config.json", config)
    _canonical_adapter_config(out_dir / "adapter_config.json")


def _canonical_adapter_config(path: Path) -> None:
    # peft keeps target_modules as a set, so its list order follows string hashing and changes
    # between processes; sorted, the file (and the adapter's DVC hash) is the same every run
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(path, config)

"""Value translators: (Axolotl value, whole Axolotl config) -> {dotted params key: value}, for keys whose
value is spelt differently here, or read together with another key. A value that cannot be honoured raises
Unsupported with the reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reprotune.axolotl.rules import ATTN, Unsupported
from reprotune.config.check import HUB_ID
from reprotune.config.sections import CHAT_TEMPLATE_NAMES, CHAT_TEMPLATES, SPECIAL_TOKEN_ROLES

# Axolotl's optimizer names -> train.optimizer (the Trainer's names; Axolotl's ao_* are torchao's AdamW too)
OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_bnb_8bit": "adamw_bnb_8bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_torch_8bit": "adamw_torch_8bit",
    "ao_adamw_8bit": "adamw_torch_8bit",
    "adamw_torch_4bit": "adamw_torch_4bit",
    "ao_adamw_4bit": "adamw_torch_4bit",
}
# Axolotl's lr_scheduler -> train.lr_scheduler (cosine_with_min_lr: cosine with train.cosine_min_lr_ratio)
SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant_with_warmup",
    "polynomial": "polynomial",
    "cosine_with_min_lr": "cosine",
}
ATTENTION = {
    "flash_attention_2": "flash_attention_2",
    "sdpa": "sdpa",
    "eager": "eager",
    # other kernels for the same attention: the model trained is the same
    "flex_attention": "sdpa",
    "xformers": "sdpa",
}


def adapter(value, cfg: dict) -> dict:
    if value == "qlora":
        if cfg.get("load_in_4bit") is False:
            raise Unsupported(
                "adapter qlora with load_in_4bit: false; qlora trains on a 4-bit base (Axolotl refuses it)"
            )
        return {"quant.load_in_4bit": True}
    if value == "lora":
        return {"quant.load_in_4bit": bool(cfg.get("load_in_4bit"))}
    raise Unsupported(f"adapter {value!r}: reprotune trains LoRA adapters (lora, qlora)")


def load_in_4bit(value, cfg: dict) -> dict:
    return {} if cfg.get("adapter") else {"quant.load_in_4bit": value}  # adapter, in any key order, decides


def optimizer(value, cfg: dict) -> dict:
    if value not in OPTIMIZERS:
        raise Unsupported(f"optimizer {value!r} is not available; available: {', '.join(OPTIMIZERS)}")
    return {"train.optimizer": OPTIMIZERS[value]}


def scheduler(value, cfg: dict) -> dict:
    if value not in SCHEDULERS:
        raise Unsupported(f"lr_scheduler {value!r} is not available; available: {', '.join(SCHEDULERS)}")
    out = {"train.lr_scheduler": SCHEDULERS[value]}
    if value == "cosine_with_min_lr":  # the Trainer's spelling of cosine_min_lr_ratio
        kwargs = cfg.get("lr_scheduler_kwargs") or {}
        if "min_lr_rate" not in kwargs:
            raise Unsupported("cosine_with_min_lr without lr_scheduler_kwargs.min_lr_rate; set cosine_min_lr_ratio")
        out["train.cosine_min_lr_ratio"] = kwargs["min_lr_rate"]
    return out


def scheduler_kwargs(value, cfg: dict) -> dict:
    """Read with lr_scheduler cosine_with_min_lr (its min_lr_rate); anything else is not carried."""
    carried = {"min_lr_rate"} if cfg.get("lr_scheduler") == "cosine_with_min_lr" else set()
    dropped = sorted(set(value) - carried)
    if dropped:
        raise Unsupported(f"{', '.join(dropped)}: only min_lr_rate with lr_scheduler cosine_with_min_lr is carried")
    return {}


def batch_size(value, cfg: dict) -> dict:
    """Axolotl derives gradient_accumulation_steps = batch_size // micro_batch_size (its default 1) when
    gradient_accumulation_steps is unset; both set must agree."""
    micro = cfg.get("micro_batch_size") or 1
    steps = cfg.get("gradient_accumulation_steps")
    if steps:
        if value != micro * steps:
            raise Unsupported(
                f"batch_size {value} contradicts micro_batch_size x gradient_accumulation_steps = {micro * steps}"
            )
        return {"train.micro_batch_size": micro}  # Axolotl's default 1 where unset, not reprotune's 2
    if value < micro:
        raise Unsupported(f"batch_size {value} is below micro_batch_size {micro}")
    return {"train.micro_batch_size": micro, "train.gradient_accumulation_steps": value // micro}


def attention(value, cfg: dict) -> dict:
    if value not in ATTENTION:
        raise Unsupported(f"attn_implementation {value!r}; available: {', '.join(ATTENTION)}")
    return {ATTN: ATTENTION[value]}


def flag(target: str, on_value) -> Callable[[Any, dict], dict]:
    return lambda value, cfg: {target: on_value} if value else {}


def instead_of(target: str, other: str) -> Callable[[Any, dict], dict]:
    """`target` set, its alternative `other` (steps vs per epoch) cleared: params take one of the two."""
    return lambda value, cfg: {target: value, other: None}


def save_strategy(value, cfg: dict) -> dict:
    if value == "steps":
        return {}
    if value == "epoch":  # unless the config says how often itself
        if cfg.get("save_steps") or cfg.get("saves_per_epoch"):
            return {}
        return {"train.saves_per_epoch": 1, "train.save_steps": None}
    raise Unsupported(f"save_strategy {value!r}: checkpoints are saved by steps or per epoch (steps, epoch)")


def base_model(value, cfg: dict) -> dict:
    out = {"base.model": value}
    if HUB_ID.match(value):  # a hub id must be pinned: main until the user does (check refuses it for a folder)
        out["base.revision"] = cfg.get("revision_of_model") or "main"
    return out


def bnb_config(value, cfg: dict) -> dict:
    dropped = sorted(k for k in value if not k.startswith("bnb_4bit_"))
    if dropped:
        raise Unsupported(f"{', '.join(dropped)}: only the bnb_4bit_* options of a 4-bit base are available")
    return {f"quant.{k}": v for k, v in value.items()}


def seed(value, cfg: dict) -> dict:
    return {"train.seed": value, "tokenize.seed": value}


def excess(value, cfg: dict) -> dict:
    choices = {"drop": "drop", "truncate": "truncate", "raise": "error"}
    if value not in choices:
        raise Unsupported(f"excess_length_strategy {value!r}; available: drop, truncate, raise")
    return {"tokenize.excess_length": choices[value]}


def target_modules(value, cfg: dict) -> dict:
    if cfg.get("lora_target_linear"):
        return {}  # every linear layer is targeted already; Axolotl takes the union
    modules = [value] if isinstance(value, str) else list(value)
    return {"lora.target_modules": modules, "lora.target_linear": False}


def bf16(value, cfg: dict) -> dict:
    return {"train.bf16": {"auto": "auto", "full": True}.get(value, bool(value))}


def gradient_checkpointing(value, cfg: dict) -> dict:
    return {"train.gradient_checkpointing": bool(value)}  # "unsloth"/"offload" are still checkpointing


def chat_template(value, cfg: dict) -> dict:
    if value not in CHAT_TEMPLATES:
        raise Unsupported(
            f"chat_template {value!r} is not available; available: tokenizer_default, jinja, "
            f"{', '.join(CHAT_TEMPLATE_NAMES)} (or tokenizer_default_fallback_<one of them>)"
        )
    return {"base.chat_template": value}


def chat_template_jinja(value, cfg: dict) -> dict:
    return {"base.chat_template": "jinja", "base.chat_template_jinja": value}


def dataset_chat_template(value, entry: dict) -> dict:
    if value != "tokenizer_default":
        raise Unsupported("a per-dataset chat template is not available; nearest: the top-level chat_template")
    return {}


def data_files(value, entry: dict) -> dict:
    return {"data_files": [value] if isinstance(value, str) else list(value)}


def special_tokens(value, cfg: dict) -> dict:
    others = sorted(set(value) - set(SPECIAL_TOKEN_ROLES))
    if others:
        raise Unsupported(f"special_tokens {', '.join(others)}: available: {', '.join(SPECIAL_TOKEN_ROLES)}")
    return {"base.special_tokens": dict(value)}


def trackers(cfg: dict) -> list[str]:
    """train.report_to for an Axolotl config: W&B when wandb_project is set (or use_wandb), MLflow when
    mlflow_experiment_name is (or use_mlflow), TensorBoard with use_tensorboard; DVCLive always."""
    on = {
        "wandb": bool(cfg.get("wandb_project") or cfg.get("use_wandb")),
        "mlflow": bool(cfg.get("mlflow_experiment_name") or cfg.get("use_mlflow")),
        "tensorboard": bool(cfg.get("use_tensorboard")),
    }
    return ["dvclive", *(name for name, used in on.items() if used)]


def tracker_key(tracker: str, target: str) -> Callable[[Any, dict], dict]:
    """A tracker's setting, with train.report_to; nothing where Axolotl leaves that tracker off."""

    def convert(value, cfg: dict) -> dict:
        if tracker not in trackers(cfg):
            return {}
        return {target: value, "train.report_to": trackers(cfg)}

    return convert


def tracker_switch(value, cfg: dict) -> dict:
    return {"train.report_to": trackers(cfg)}


def mlflow_run_name(value, cfg: dict) -> dict:
    """Axolotl names the run after wandb_name when W&B is on (the Trainer has one run name for both)."""
    if "wandb" in trackers(cfg) and (cfg.get("wandb_name") or cfg.get("wandb_run_id")):
        return {}
    return tracker_key("mlflow", "train.mlflow_run_name")(value, cfg)


def wandb_run_id(value, cfg: dict) -> dict:
    """Axolotl names the run after wandb_run_id when wandb_name is unset."""
    return {} if cfg.get("wandb_name") else tracker_key("wandb", "train.wandb_name")(value, cfg)


# Axolotl's `fsdp:` words (FSDP1's sharding options) -> the train.fsdp settings that do the same under FSDP2
FSDP_WORDS = {
    "full_shard": {},
    "auto_wrap": {},
    "offload": {"train.fsdp.offload_params": True},
    "shard_grad_op": {"train.fsdp.reshard_after_forward": False},
}
# FSDP1's sharding strategies: FSDP2 always shards fully, and reshard_after_forward false is SHARD_GRAD_OP
FSDP_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
FSDP_STATE_DICTS = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def fsdp_switch(value, cfg: dict) -> dict:
    """`fsdp: [full_shard, auto_wrap, offload]` (or the words in one string): FSDP on, with what they set."""
    words = value.split() if isinstance(value, str) else list(value)
    out = {"train.distributed": "fsdp"}
    for word in words:
        if word not in FSDP_WORDS:
            raise Unsupported(f"fsdp option {word!r} is not available ({', '.join(FSDP_WORDS)})")
        out |= FSDP_WORDS[word]
    return out


def fsdp_version(value, cfg: dict) -> dict:
    """Version 2 as it is; 1 runs as FSDP2 (the same sharding; transformers drops FSDP1)."""
    if int(value) not in (1, 2):
        raise Unsupported(f"fsdp_version {value!r}: 1 or 2")
    return {"train.distributed": "fsdp", "train.fsdp.version": 2}


def fsdp_wrap_policy(value, cfg: dict) -> dict:
    if value != "TRANSFORMER_BASED_WRAP":
        raise Unsupported(f"fsdp auto_wrap_policy {value!r}: TRANSFORMER_BASED_WRAP (a unit per decoder layer)")
    return {"train.fsdp.auto_wrap_policy": value}


def fsdp_layer_class(value, cfg: dict) -> dict:
    names = [value] if isinstance(value, str) else list(value)
    if len(names) != 1:
        raise Unsupported(f"{len(names)} layer classes: one decoder layer class is wrapped")
    return {"train.fsdp.transformer_layer_cls_to_wrap": names[0]}


def fsdp_state_dict(value, cfg: dict) -> dict:
    if value not in FSDP_STATE_DICTS:
        raise Unsupported(f"fsdp state_dict_type {value!r}: {' or '.join(FSDP_STATE_DICTS)}")
    return {"train.fsdp.state_dict_type": value}


def fsdp_strategy(value, cfg: dict) -> dict:
    if value not in FSDP_STRATEGIES:
        raise Unsupported(f"fsdp sharding_strategy {value!r}: {' or '.join(FSDP_STRATEGIES)} (HYBRID: not available)")
    return {"train.fsdp.reshard_after_forward": FSDP_STRATEGIES[value]}


def fsdp_flag(name: str) -> Callable[[Any, dict], dict]:
    return lambda value, cfg: {f"train.fsdp.{name}": bool(value)}

"""`reprotune import-axolotl`: an Axolotl config as a params.yaml, with every key accounted for.

Features
- One table (KEYS, DATASET_KEYS, PATTERNS) says what becomes of each Axolotl key: mapped (same meaning,
  to a named params key), translated (a different spelling of the same training: optimizer names,
  `adapter: qlora`, evals_per_epoch), ignored (the pipeline does it already, or it only makes a GPU run
  faster or leaner and the model trained is the same) or unsupported (with the reason and the nearest
  alternative). The README's key map is printed from the same table (`python -m reprotune.axolotl`).
- The output keeps the comments of the project's params.yaml; values are Axolotl's where it sets them
  and reprotune's documented defaults (config/sections.py) elsewhere, never the built-in model's tuning
  in the shipped params.yaml. The result is checked as `reprotune check` would.
- Empty values (`wandb_project:`) are unset, as Axolotl reads them; an unsupported feature set to false
  (`load_in_8bit: false`) is ignored.
- Exit codes: 0 when every key is mapped, translated or ignored and the output passes the check; 2 when a
  key cannot be honoured or the check fails (the output is still written, so it can be fixed by hand).

Trade-offs
- A key this table does not know is unsupported (exit 2), not guessed at: Axolotl has hundreds of keys
  and a silently dropped one changes the training.
- Values are translated one key at a time, plus the few pairs Axolotl reads together (adapter with
  load_in_4bit, lora_target_linear with lora_target_modules, eval/save steps with their per-epoch forms).
"""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reprotune.config.check import HUB_ID, check_params, fill_defaults, schema
from reprotune.config.sections import CHAT_TEMPLATES, SPECIAL_TOKEN_ROLES
from reprotune.io import atomic_file

MAPPED, TRANSLATED, IGNORED, UNSUPPORTED = "mapped", "translated", "ignored", "unsupported"
SPEED_ONLY = "makes a GPU run faster or leaner; the model trained is the same"
PIPELINE_DOES_IT = "the pipeline does this itself"
PER_EPOCH = "steps from the packed data size at train time"
ATTN = "train.attn_implementation"


@dataclass(frozen=True)
class Rule:
    status: str
    target: str = ""
    """The params key(s) written, as shown in the table."""
    note: str = ""
    convert: Callable[[Any, dict], dict] | None = None
    """(value, whole Axolotl config) -> {dotted params key: value}; None: a same-valued copy to `target`."""


@dataclass(frozen=True)
class Row:
    key: str
    value: Any
    status: str
    target: str
    note: str


def same(target: str, note: str = "") -> Rule:
    return Rule(MAPPED, target, note)


def ignored(note: str) -> Rule:
    return Rule(IGNORED, note=note)


def unsupported(note: str) -> Rule:
    return Rule(UNSUPPORTED, note=note)


# ---- translations --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adamw_bnb_8bit": "adamw_bnb_8bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_32bit": "adamw_torch",
}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
ATTENTION = {"flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}


def _adapter(value, cfg: dict) -> dict:
    if value == "qlora":
        if cfg.get("load_in_4bit") is False:
            raise Unsupported(
                "adapter qlora with load_in_4bit: false; qlora trains on a 4-bit base (Axolotl refuses it)"
            )
        return {"quant.load_in_4bit": True}
    if value == "lora":
        return {"quant.load_in_4bit": bool(cfg.get("load_in_4bit"))}
    raise Unsupported(f"adapter {value!r}: reprotune trains LoRA adapters (lora, qlora)")


def _load_in_4bit(value, cfg: dict) -> dict:
    return {} if cfg.get("adapter") else {"quant.load_in_4bit": value}  # adapter, in any key order, decides


def _optimizer(value, cfg: dict) -> dict:
    if value not in OPTIMIZERS:
        raise Unsupported(f"optimizer {value!r} is not available; nearest: adamw_torch (or adamw_bnb_8bit for memory)")
    return {"train.optimizer": OPTIMIZERS[value]}


def _scheduler(value, cfg: dict) -> dict:
    if value not in SCHEDULERS:
        raise Unsupported(f"lr_scheduler {value!r} is not available; nearest: cosine, linear or constant")
    return {"train.lr_scheduler": SCHEDULERS[value]}


def _attention(value, cfg: dict) -> dict:
    if value not in ATTENTION:
        raise Unsupported(f"attn_implementation {value!r}; available: auto, sdpa, eager, flash_attention_2")
    return {ATTN: ATTENTION[value]}


def _flag(target: str, on_value) -> Callable[[Any, dict], dict]:
    return lambda value, cfg: {target: on_value} if value else {}


def _instead_of(target: str, other: str) -> Callable[[Any, dict], dict]:
    """`target` set, its alternative `other` (steps vs per epoch) cleared: params take one of the two."""
    return lambda value, cfg: {target: value, other: None}


def _base_model(value, cfg: dict) -> dict:
    out = {"base.model": value}
    if HUB_ID.match(value):  # a hub id must be pinned: main until the user does (check refuses it for a folder)
        out["base.revision"] = cfg.get("revision_of_model") or "main"
    return out


def _bnb_config(value, cfg: dict) -> dict:
    dropped = sorted(k for k in value if not k.startswith("bnb_4bit_"))
    if dropped:
        raise Unsupported(f"{', '.join(dropped)}: only the bnb_4bit_* options of a 4-bit base are available")
    return {f"quant.{k}": v for k, v in value.items()}


def _seed(value, cfg: dict) -> dict:
    return {"train.seed": value, "tokenize.seed": value}


def _excess(value, cfg: dict) -> dict:
    choices = {"drop": "drop", "truncate": "truncate", "raise": "error"}
    if value not in choices:
        raise Unsupported(f"excess_length_strategy {value!r}; available: drop, truncate, raise")
    return {"tokenize.excess_length": choices[value]}


def _target_modules(value, cfg: dict) -> dict:
    if cfg.get("lora_target_linear"):
        return {}  # every linear layer is targeted already; Axolotl takes the union
    modules = [value] if isinstance(value, str) else list(value)
    return {"lora.target_modules": modules, "lora.target_linear": False}


def _bf16(value, cfg: dict) -> dict:
    return {"train.bf16": {"auto": "auto", "full": True}.get(value, bool(value))}


def _gradient_checkpointing(value, cfg: dict) -> dict:
    return {"train.gradient_checkpointing": bool(value)}  # "unsloth"/"offload" are still checkpointing


def _chat_template(value, cfg: dict) -> dict:
    if value not in CHAT_TEMPLATES:
        raise Unsupported(f"chat_template {value!r} is not available; available: {', '.join(CHAT_TEMPLATES)}")
    return {"base.chat_template": value}


def _chat_template_jinja(value, cfg: dict) -> dict:
    return {"base.chat_template": "jinja", "base.chat_template_jinja": value}


def _dataset_chat_template(value, entry: dict) -> dict:
    if value != "tokenizer_default":
        raise Unsupported("a per-dataset chat template is not available; nearest: the top-level chat_template")
    return {}


def _data_files(value, entry: dict) -> dict:
    return {"data_files": [value] if isinstance(value, str) else list(value)}


def _special_tokens(value, cfg: dict) -> dict:
    others = sorted(set(value) - set(SPECIAL_TOKEN_ROLES))
    if others:
        raise Unsupported(f"special_tokens {', '.join(others)}: available: {', '.join(SPECIAL_TOKEN_ROLES)}")
    return {"base.special_tokens": dict(value)}


class Unsupported(Exception):
    """A value (not the key) cannot be honoured."""


# ---- the map -------------------------------------------------------------------------------------------

KEYS: dict[str, Rule] = {
    # base
    "base_model": Rule(MAPPED, "base.model", "hub ids get base.revision: main (pin it to a commit)", _base_model),
    "revision_of_model": same("base.revision"),
    "trust_remote_code": same("base.trust_remote_code"),
    "base_model_config": ignored("the base model's own config.json is used"),
    "model_type": ignored("read from the base model's config"),
    "tokenizer_type": ignored("the base model's fast tokenizer is used (AutoTokenizer)"),
    "tokenizer_config": unsupported("a tokenizer from another folder; nearest: put it in the base model folder"),
    # data
    "datasets": Rule(MAPPED, "data.datasets", "each entry's keys are listed as datasets[i].key"),
    "test_datasets": Rule(MAPPED, "data.test_datasets", "each entry's keys are listed as test_datasets[i].key"),
    "val_set_size": same("tokenize.val_set_size"),
    "dataset_prepared_path": ignored(f"{PIPELINE_DOES_IT}: data/validated and data/packed, cached by DVC"),
    "push_dataset_to_hub": ignored("the prepared data lives in DVC's cache (dvc push to share it)"),
    "dataset_processes": same("tokenize.num_proc"),
    "dataset_num_proc": same("tokenize.num_proc"),
    "shuffle_merged_datasets": ignored("records keep file order; the split and training order are seeded"),
    "dataset_exact_deduplication": same("data.dedup", "exact duplicates after normalisation (reprotune's default: on)"),
    "chat_template": Rule(
        MAPPED,
        "base.chat_template",
        "tokenizer_default, chatml, llama3, mistral_v1, gemma, phi_3, qwen_25",
        _chat_template,
    ),
    "chat_template_jinja": Rule(
        MAPPED, "base.chat_template_jinja", "with base.chat_template: jinja", _chat_template_jinja
    ),
    "default_system_message": unsupported("not available yet; nearest: a system message in the data"),
    "special_tokens": Rule(
        MAPPED,
        "base.special_tokens",
        "a token not in the vocabulary is added (embeddings grow; the adapter saves the new rows)",
        _special_tokens,
    ),
    "tokens": same("base.tokens", "added to the vocabulary (embeddings grow; the adapter saves the new rows)"),
    "added_tokens_overrides": unsupported(
        "renaming the base's own added tokens is not available; nearest: base.tokens"
    ),
    "eot_tokens": ignored("the token that closes each turn in the chat template is found and trained by itself"),
    "sequence_len": same("tokenize.sequence_len"),
    "sample_packing": same("tokenize.sample_packing"),
    "eval_sample_packing": ignored("validation rows are packed like training rows"),
    "pad_to_sequence_len": ignored(SPEED_ONLY),
    "train_on_inputs": same("tokenize.train_on_inputs"),
    "excess_length_strategy": Rule(TRANSLATED, "tokenize.excess_length", "raise -> error", _excess),
    # quantization and adapter
    "adapter": Rule(TRANSLATED, "quant.load_in_4bit", "qlora: 4-bit base; lora: 16/32-bit base", _adapter),
    "load_in_4bit": Rule(MAPPED, "quant.load_in_4bit", "read with adapter when set", _load_in_4bit),
    "load_in_8bit": unsupported("an 8-bit base is not available; nearest: adapter qlora (4-bit) or lora (16-bit)"),
    "bnb_config_kwargs": Rule(
        MAPPED, "quant.bnb_4bit_*", "bnb_4bit_* entries to the same names under quant", _bnb_config
    ),
    "lora_r": same("lora.r"),
    "lora_alpha": same("lora.alpha"),
    "lora_dropout": same("lora.dropout"),
    "lora_target_linear": same("lora.target_linear"),
    "lora_target_modules": Rule(
        MAPPED, "lora.target_modules", "with lora_target_linear: true, the linear layers cover them", _target_modules
    ),
    "lora_modules_to_save": same("lora.modules_to_save"),
    "peft_use_rslora": same("lora.use_rslora"),
    "peft_use_dora": same("lora.use_dora"),
    "lora_model_dir": unsupported("starting from an existing adapter is not available; the train stage resumes"),
    "lora_mlp_kernel": ignored(SPEED_ONLY),
    "lora_qkv_kernel": ignored(SPEED_ONLY),
    "lora_o_kernel": ignored(SPEED_ONLY),
    # training
    "micro_batch_size": same("train.micro_batch_size"),
    "gradient_accumulation_steps": same("train.gradient_accumulation_steps"),
    "num_epochs": same("train.num_epochs"),
    "max_steps": same("train.max_steps"),
    "learning_rate": same("train.learning_rate"),
    "lr_scheduler": Rule(TRANSLATED, "train.lr_scheduler", "constant_with_warmup -> constant", _scheduler),
    "warmup_ratio": same("train.warmup_ratio"),
    "warmup_steps": same("train.warmup_steps"),
    "weight_decay": same("train.weight_decay"),
    "max_grad_norm": same("train.max_grad_norm"),
    "optimizer": Rule(TRANSLATED, "train.optimizer", "fused/32-bit paged AdamW -> adamw_torch", _optimizer),
    "seed": Rule(TRANSLATED, "train.seed, tokenize.seed", "one seed for the split and training", _seed),
    "bf16": Rule(TRANSLATED, "train.bf16", "full -> true", _bf16),
    "fp16": same("train.fp16"),
    "tf32": ignored(SPEED_ONLY),
    "flash_attention": Rule(
        TRANSLATED,
        ATTN,
        "true -> flash_attention_2",
        _flag(ATTN, "flash_attention_2"),
    ),
    "sdp_attention": Rule(TRANSLATED, ATTN, "true -> sdpa", _flag(ATTN, "sdpa")),
    "xformers_attention": Rule(TRANSLATED, ATTN, "true -> sdpa (same model)", _flag(ATTN, "sdpa")),
    "attn_implementation": Rule(MAPPED, ATTN, "", _attention),
    "gradient_checkpointing": Rule(
        MAPPED, "train.gradient_checkpointing", "unsloth/offload -> true", _gradient_checkpointing
    ),
    "gradient_checkpointing_kwargs": ignored(SPEED_ONLY),
    "activation_offloading": ignored(SPEED_ONLY),
    "torch_compile": ignored(SPEED_ONLY),
    "torch_compile_backend": ignored(SPEED_ONLY),
    "plugins": ignored(f"Liger kernels, Cut Cross Entropy and the like: {SPEED_ONLY}"),
    "eval_steps": Rule(MAPPED, "train.eval_steps", "", _instead_of("train.eval_steps", "train.evals_per_epoch")),
    "save_steps": Rule(MAPPED, "train.save_steps", "", _instead_of("train.save_steps", "train.saves_per_epoch")),
    "evals_per_epoch": Rule(
        TRANSLATED,
        "train.evals_per_epoch",
        PER_EPOCH,
        _instead_of("train.evals_per_epoch", "train.eval_steps"),
    ),
    "saves_per_epoch": Rule(
        TRANSLATED,
        "train.saves_per_epoch",
        PER_EPOCH,
        _instead_of("train.saves_per_epoch", "train.save_steps"),
    ),
    "logging_steps": same("train.logging_steps"),
    "loss_watchdog_threshold": same("train.loss_watchdog_threshold"),
    "loss_watchdog_patience": same("train.loss_watchdog_patience"),
    "early_stopping_patience": unsupported("not available; nearest: loss_watchdog_* or max_steps"),
    "save_total_limit": ignored("the train stage keeps the last two checkpoints"),
    "save_safetensors": ignored("safetensors only, always"),
    "output_dir": ignored(f"{PIPELINE_DOES_IT}: fixed folders under models/"),
    "resume_from_checkpoint": ignored(f"{PIPELINE_DOES_IT}: the train stage resumes from its last checkpoint"),
    "auto_resume_from_checkpoints": ignored(f"{PIPELINE_DOES_IT}: the train stage resumes by itself"),
    "strict": ignored("params are always checked strictly (reprotune check)"),
    "debug": ignored("logging only"),
    "logging_first_step": ignored("logging only"),
    "save_first_step": ignored("checkpointing only"),
    "dataloader_num_workers": ignored(SPEED_ONLY),
    "dataloader_pin_memory": ignored(SPEED_ONLY),
    "dataloader_prefetch_factor": ignored(SPEED_ONLY),
    "group_by_length": ignored("rows are packed, which makes this moot"),
    "ddp_find_unused_parameters": ignored("set by the train stage"),
    "use_tensorboard": ignored("DVCLive logs metrics and plots (dvclive/; `dvc plots show`)"),
    "merge_lora": ignored(f"{PIPELINE_DOES_IT}: the merge stage"),
    "hub_model_id": unsupported("pushing to a hub is not done by the pipeline; upload models/export yourself"),
    "hub_strategy": unsupported("pushing to a hub is not done by the pipeline; upload models/export yourself"),
    # training kinds this project does not do
    "rl": unsupported("preference / RL training (DPO, ORPO, KTO, GRPO) is not available; reprotune does SFT"),
    "reward_model": unsupported("reward-model training is not available; reprotune does SFT"),
    "process_reward_model": unsupported("reward-model training is not available; reprotune does SFT"),
    "deepspeed": unsupported("DeepSpeed is not used; several GPUs train with DDP (accelerate launch)"),
    "fsdp": unsupported("FSDP is not available yet; several GPUs train with DDP (accelerate launch)"),
    "fsdp_config": unsupported("FSDP is not available yet; several GPUs train with DDP (accelerate launch)"),
    "fsdp_version": unsupported("FSDP is not available yet; several GPUs train with DDP (accelerate launch)"),
    "unfrozen_parameters": unsupported("full fine-tuning of chosen layers is not available; nearest: LoRA"),
    "processor_type": unsupported("vision and audio models are not available; text-only SFT"),
    "image_size": unsupported("vision models are not available; text-only SFT"),
    "image_resize_algorithm": unsupported("vision models are not available; text-only SFT"),
    "skip_prepare_dataset": unsupported("vision and audio datasets are not available; text-only SFT"),
    "remove_unused_columns": ignored("set by the train stage"),
    "lora_target_parameters": unsupported("LoRA on MoE expert parameters is not available yet"),
}
# Families of keys, matched when the key itself is not in KEYS.
PATTERNS: list[tuple[str, Rule]] = [
    (r"^wandb_", Rule(TRANSLATED, "", "DVCLive logs metrics and plots (dvclive/, `dvc exp show`); no W&B run")),
    (r"^(mlflow|comet|swanlab|trackio)_", ignored("DVCLive logs metrics and plots (dvclive/, `dvc exp show`)")),
    (r"^liger_", ignored(SPEED_ONLY)),
    (r"^cut_cross_entropy", ignored(SPEED_ONLY)),
    (r"^flash_attn_", ignored(SPEED_ONLY)),
    (r"^(dpo|orpo|kto|simpo|grpo|trl|ipo|cpo)_", unsupported("preference / RL training is not available; SFT only")),
    (r"^(moe|expert)_|_moe_|^output_router_logits$", unsupported("MoE-specific options are not available yet")),
    (r"^(vision|audio|image)_", unsupported("vision and audio models are not available; text-only SFT")),
]
DATASET_KEYS: dict[str, Rule] = {
    "path": same("path"),
    "type": Rule(MAPPED, "type", "alpaca, chat_template, completion; alpaca_w_system.load_instruct -> alpaca"),
    "split": same("split"),
    "field_messages": same("field_messages"),
    "message_property_mappings": same("message_property_mappings"),
    "message_field_role": Rule(MAPPED, "message_property_mappings.role", "the older spelling"),
    "message_field_content": Rule(MAPPED, "message_property_mappings.content", "the older spelling"),
    "roles": same("roles"),
    "drop_system_message": same("drop_system_message"),
    "field_instruction": same("field_instruction"),
    "field_input": same("field_input"),
    "field_output": same("field_output"),
    "field_system": same("field_system"),
    "field": Rule(MAPPED, "field_text", "completion: the text field"),
    "roles_to_train": same("roles_to_train", "this dataset's; unset: tokenize.roles_to_train (assistant)"),
    "train_on_eos": same("train_on_eos", "this dataset's; unset: tokenize.train_on_eos (turn)"),
    "ds_type": same("ds_type", "json, parquet, csv, text, arrow; local files (the hub says its own)"),
    "chat_template": Rule(TRANSLATED, "", "tokenizer_default only: one template for all", _dataset_chat_template),
    "data_files": Rule(MAPPED, "data_files", "files under a folder path or in the hub repository", _data_files),
    "name": same("name", "the hub dataset's configuration"),
    "shards": same("shards", "cut as Axolotl cuts them: shuffled with tokenize.seed, then Dataset.shard"),
    "shards_idx": same("shards_idx"),
    "weight": same("weight", "training copies per record, drawn after the split (not in Axolotl itself)"),
}
DATASET_TYPES = {
    "alpaca": "alpaca",
    "alpaca_w_system.load_instruct": "alpaca",
    "chat_template": "chat_template",
    "completion": "completion",
}


# ---- importing -----------------------------------------------------------------------------------------


def rule_for(key: str) -> Rule:
    if key in KEYS:
        return KEYS[key]
    for pattern, rule in PATTERNS:
        if re.search(pattern, key):
            return rule
    return unsupported("not a key this importer knows: check what it does and set its reprotune equivalent")


def _empty(value) -> bool:
    return value is None or value == "" or value == [] or value == {}


def translate(cfg: dict) -> tuple[dict, list[Row]]:
    """Axolotl config -> ({dotted params key: value}, table rows in the config's key order)."""
    out: dict[str, Any] = {}
    rows: list[Row] = []
    for key, value in cfg.items():
        if _empty(value):
            if key != "adapter":  # an unset adapter gets its own row below
                rows.append(Row(key, value, IGNORED, "", "empty: unset, as Axolotl reads it"))
            continue
        if key in ("datasets", "test_datasets"):
            if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
                rows.append(Row(key, value, UNSUPPORTED, "", "not a list of dataset mappings"))
                continue
            out[f"data.{key}"], more = _datasets(key, value)
            rows.append(Row(key, f"{len(value)} entries", MAPPED, f"data.{key}", ""))
            rows += more
            continue
        rule = rule_for(key)
        if value is False and rule.status == UNSUPPORTED:  # a feature switched off is no feature
            rule = ignored("false: off, as by default")
        row = Row(key, value, rule.status, rule.target, rule.note)
        try:
            out |= _apply(key, value, rule, cfg)
        except Unsupported as e:
            row = dataclasses.replace(row, status=UNSUPPORTED, note=str(e))
        rows.append(row)
    if not _empty(cfg.get("test_datasets")) and _empty(cfg.get("val_set_size")):
        out["tokenize.val_set_size"] = 0  # Axolotl's default 0; reprotune's 0.05 would contradict test_datasets
        rows.append(
            Row("val_set_size", None, TRANSLATED, "tokenize.val_set_size", "0: test_datasets is the validation set")
        )
    if _empty(cfg.get("adapter")):  # Axolotl's default: every weight trained
        note = "unset: Axolotl fine-tunes every weight; reprotune trains LoRA adapters (set adapter: lora or qlora)"
        rows.append(Row("adapter", cfg.get("adapter"), UNSUPPORTED, "", note))
    return out, rows


def _apply(key: str, value, rule: Rule, cfg: dict) -> dict:
    if rule.status in (IGNORED, UNSUPPORTED):
        return {}
    if rule.convert:
        return rule.convert(value, cfg)
    return {rule.target: value} if rule.target else {}


def _datasets(group: str, entries: list) -> tuple[list[dict], list[Row]]:
    """One params entry per Axolotl dataset of `group` (datasets or test_datasets), and a row per key."""
    datasets, rows = [], []
    for i, entry in enumerate(entries):
        ds: dict[str, Any] = {}
        for key, value in entry.items():
            where = f"{group}[{i}].{key}"
            if _empty(value):
                rows.append(Row(where, value, IGNORED, "", "empty: unset, as Axolotl reads it"))
                continue
            rule = DATASET_KEYS.get(key, unsupported("not a dataset key this importer knows"))
            target = rule.target and f"data.{group}[{i}].{rule.target}"
            row = Row(where, value, rule.status, target, rule.note)
            try:
                if rule.convert:
                    ds |= rule.convert(value, entry)
                elif rule.status in (MAPPED, TRANSLATED):
                    _dataset_key(key, value, rule, ds)
            except Unsupported as e:
                row = dataclasses.replace(row, status=UNSUPPORTED, note=str(e))
            rows.append(row)
        if group == "test_datasets" and _empty(entry.get("split")):  # Axolotl reads a test set's test split
            ds["split"] = "test"
            note = "unset: test, the split Axolotl reads for a hub test set (local files have one)"
            rows.append(Row(f"{group}[{i}].split", None, TRANSLATED, f"data.{group}[{i}].split", note))
        datasets.append(ds)
    return datasets, rows


def _dataset_key(key: str, value, rule: Rule, ds: dict) -> None:
    if key == "type":
        ds["type"] = DATASET_TYPES.get(value, "chat_template")
        if value not in DATASET_TYPES:
            raise Unsupported(
                f"dataset type {value!r} is not available ({', '.join(DATASET_TYPES)}); written as "
                "chat_template, the nearest for message lists: check the data's layout"
            )
    elif rule.target.startswith("message_property_mappings"):  # the mapping, or one of its older spellings
        new = dict(value) if key == rule.target else {rule.target.rpartition(".")[2]: value}
        given = ds.get("message_property_mappings", {})
        clash = sorted(k for k in new.keys() & given.keys() if new[k] != given[k])
        if clash:
            raise Unsupported(f"contradicts the other spelling for {', '.join(clash)} (Axolotl refuses it too)")
        ds["message_property_mappings"] = {**given, **new}
    else:
        ds[rule.target] = value


def params_from(cfg: dict) -> tuple[dict, list[Row]]:
    """The params (nested dict) for an Axolotl config, and the table: every key at reprotune's documented
    default (not the shipped params.yaml's tuning), then the translated values."""
    values, rows = translate(cfg)
    params = fill_defaults({}, schema())
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    return params, rows


# ---- writing and reporting -----------------------------------------------------------------------------


def render(params: dict, template: Path) -> str:
    """`params` in the layout of `template` (a params.yaml): its comments and order, these values.
    Values equal to the template's are left as written there."""
    from ruamel.yaml import YAML

    ryaml = YAML()
    ryaml.width = 4096
    ryaml.preserve_quotes = True
    ryaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's layout
    ryaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    ryaml.representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _float(v)))
    doc = ryaml.load(template.read_text())
    for section, values in params.items():
        for key, value in values.items():
            if doc[section].get(key) != value:  # ruamel's round-trip types compare equal to plain ones
                doc[section][key] = _styled(value, flow=key not in ("datasets", "test_datasets"))
    buffer = io.StringIO()
    ryaml.dump(doc, buffer)
    return buffer.getvalue()


def _float(value: float) -> str:
    """A float both YAML 1.1 (PyYAML) and 1.2 (ruamel, DVC) read as a number: 1e-05 needs a dot."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _styled(value, flow: bool):
    """Lists and mappings in flow style ([a, b], {k: v}) inside a value, block style at the top of a
    block value (the datasets list: one entry per block); strings that YAML could misread are quoted."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, list):
        seq = CommentedSeq(_styled(v, flow=flow or isinstance(v, list)) for v in value)
        if flow:
            seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, _styled(v, flow=True)) for k, v in value.items())
        if flow:
            mapping.fa.set_flow_style()
        return mapping
    if isinstance(value, str) and not re.fullmatch(r"[\w./:-]+", value):
        return DoubleQuotedScalarString(value)
    return value


def table(rows: list[Row]) -> str:
    """The rows as aligned text columns: axolotl key, value, status, reprotune key, note."""
    shown = [("axolotl", "value", "status", "reprotune", "note")]
    shown += [(r.key, _short(r.value), r.status, r.target or "-", r.note) for r in rows]
    widths = [max(len(line[i]) for line in shown) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in shown)


def _short(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return text if len(text) <= 40 else text[:37] + "..."


def key_map_markdown() -> str:
    """The README's key map: every key and family this importer knows, from the same table it uses."""
    lines = ["| Axolotl key | status | reprotune | note |", "|---|---|---|---|"]
    for key, rule in KEYS.items():
        lines.append(f"| `{key}` | {rule.status} | {_code(rule.target)} | {rule.note} |")
    for pattern, rule in PATTERNS:
        lines.append(f"| keys matching `{pattern}` | {rule.status} | {_code(rule.target)} | {rule.note} |")
    for key, rule in DATASET_KEYS.items():
        target = rule.target and f"data.datasets[].{rule.target}"
        lines.append(f"| `datasets[].{key}` | {rule.status} | {_code(target)} | {rule.note} |")
    return "\n".join(lines)


def _code(target: str) -> str:
    return ", ".join(f"`{t.strip()}`" for t in target.split(",")) if target else "-"


def import_axolotl(source: Path, out: Path, template: Path, root: Path) -> int:
    """Write `out` from Axolotl config `source`; print the table and any check problems; the exit code."""
    from reprotune.config import EXIT_BAD_INPUT

    cfg = yaml.safe_load(source.read_text()) or {}
    if not isinstance(cfg, dict):
        print(f"{source}: not an Axolotl config (a YAML mapping)", file=sys.stderr)
        return EXIT_BAD_INPUT
    params, rows = params_from(cfg)
    text = render(params, template)
    with atomic_file(out) as f:
        f.write(text)
    print(table(rows))
    counts = {s: sum(r.status == s for r in rows) for s in (MAPPED, TRANSLATED, IGNORED, UNSUPPORTED)}
    print(f"\n{len(rows)} keys: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; wrote {out}")
    if params["base"]["revision"] == "main" and not cfg.get("revision_of_model"):
        print(f"base.revision is main: pin it to a commit of {params['base']['model']} for a reproducible base")
    _, problems = check_params(yaml.safe_load(text), repo_root=root)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_BAD_INPUT if counts[UNSUPPORTED] or problems else 0


def write_key_map(readme: Path) -> None:
    """Replace the generated key map between its markers in `readme`."""
    text = readme.read_text()
    block = re.compile(r"(<!-- axolotl-key-map:start[^>]*-->\n)(.*?)(\n<!-- axolotl-key-map:end -->)", re.S)
    if not block.search(text):
        raise SystemExit(f"{readme}: no axolotl-key-map markers")
    with atomic_file(readme) as f:
        f.write(block.sub(lambda m: m.group(1) + key_map_markdown() + m.group(3), text))


if __name__ == "__main__":  # python -m reprotune.axolotl [README.md]: print the key map, or rewrite it there
    if len(sys.argv) > 1:
        write_key_map(Path(sys.argv[1]))
    else:
        print(key_map_markdown())

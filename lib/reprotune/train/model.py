"""The trainable model: the base (4-bit NF4/FP4 or full precision) with a LoRA adapter from peft.

- 4-bit (quant.load_in_4bit): bitsandbytes quantizes every Linear but the output head while loading;
  compute dtype and attention come from hardware.resolve; quant storage `auto` is uint8 (FSDP would
  need it equal to the compute dtype, see the package docstring). `prepare_model_for_kbit_training`
  freezes the base, upcasts the small non-quantized parts (norms, embeddings, head) to fp32 and
  turns on non-reentrant gradient checkpointing.
- Without 4-bit: the base is loaded in the compute dtype (fp32 on CPU) and frozen by peft.
- LoRA targets: `target_linear` adapts every nn.Linear leaf (bnb's Linear4bit is one) except the
  output head, found from the model itself, so any architecture works without a name list;
  `target_modules` is checked against the model and an entry that matches nothing is an error
  (peft would otherwise fail late or, with regexes, silently adapt nothing).
- Attention: as resolved, except that packed rows under sdpa use attention.NAME (per sequence).
- The adapter init is seeded (train.seed) right before peft creates it; `use_cache` is always off
  (training never reuses keys/values, and transformers only detects padding-free packed rows from
  position_ids when no cache is passed).
"""

from __future__ import annotations

import os
from pathlib import Path

from reprotune.config.sections import LoraConfig, QuantConfig, TrainConfig
from reprotune.errors import BadInput
from reprotune.hardware import DTYPE_NAMES, Capabilities

STORAGE_DTYPES = {"auto": "uint8", "uint8": "uint8", **DTYPE_NAMES}


def load_trainable(
    base_dir: Path, quant: QuantConfig, lora: LoraConfig, train: TrainConfig, caps: Capabilities, attn: str
):
    """The base from `base_dir` with a fresh LoRA adapter; only the adapter requires grad.

    `attn` is the attn_implementation to load (caps' resolved one, or attention.NAME for packed rows).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation=attn, **_load_kwargs(quant, caps))
    model.config.use_cache = False
    if quant.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    set_seed(train.seed)  # LoRA A matrices are drawn from the global RNG
    return get_peft_model(model, adapter_config(model, lora))


def _load_kwargs(quant: QuantConfig, caps: Capabilities) -> dict:
    import torch

    kwargs = {"dtype": getattr(torch, caps.compute_dtype)}
    if quant.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, caps.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, STORAGE_DTYPES[quant.bnb_4bit_quant_storage]),
        )
        # bitsandbytes quantizes on the device the weights land on; under DDP each process owns one GPU
        local = int(os.environ.get("LOCAL_RANK", 0))
        kwargs["device_map"] = {"": f"cuda:{local}" if caps.device == "cuda" else "cpu"}
    return kwargs


def adapter_config(model, lora: LoraConfig):
    from peft import LoraConfig

    head = output_head_name(model)
    targets = linear_leaf_names(model, exclude=head) if lora.target_linear else list(lora.target_modules)
    check_names(model, targets, "lora.target_modules")
    saved = list(lora.modules_to_save) if lora.modules_to_save else None
    if saved:
        check_names(model, saved, "lora.modules_to_save")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=saved,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def output_head_name(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def linear_leaf_names(model, exclude: str) -> list[str]:
    """Sorted last-name parts of every Linear leaf except `exclude` (e.g. q_proj, ..., down_proj)."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != exclude
    }
    if exclude.rsplit(".", 1)[-1] in names:
        raise BadInput(
            f"lora.target_linear: the output head {exclude!r} shares its name with other Linear "
            "layers; set lora.target_linear: false and list lora.target_modules explicitly"
        )
    return sorted(names)


def check_names(model, entries: list[str], key: str) -> None:
    """Every entry must name a module, fully or as a dotted suffix (peft's matching rule); a miss is bad
    params (exit 2), found only once the model is loaded."""
    names = [name for name, _ in model.named_modules()]
    for entry in entries:
        if not any(name == entry or name.endswith("." + entry) for name in names):
            raise BadInput(
                f"{key}: {entry!r} matches no module of the base model "
                f"(linear layers: {', '.join(linear_leaf_names(model, output_head_name(model)))})"
            )

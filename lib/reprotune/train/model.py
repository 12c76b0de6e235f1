"""The trainable model: the base (4-bit NF4/FP4 or full precision) with a LoRA adapter from peft.

- 4-bit (quant.load_in_4bit): bitsandbytes quantizes every Linear but the output head while loading
  (settings from reprotune.quant, shared with evaluate and merge); compute dtype and attention come
  from hardware.resolve. `prepare_model_for_kbit_training`
  freezes the base, upcasts the small non-quantized parts (norms, embeddings, head) to fp32 and
  turns on non-reentrant gradient checkpointing.
- Without 4-bit: the base is loaded in the compute dtype (fp32 on CPU) and frozen by peft.
- LoRA targets: `target_linear` adapts every nn.Linear leaf (bnb's Linear4bit is one) except the
  output head, found from the model itself, so any architecture works without a name list;
  `target_modules` is checked against the model and an entry that matches nothing is an error
  (peft would otherwise fail late or, with regexes, silently adapt nothing).
- Attention: as resolved, except that packed rows under sdpa use attention.NAME (per sequence).
- Added tokens (base.tokens, new base.special_tokens; their ids in models/base's provenance): their rows of
  the input embedding and of an untied output head are trained through peft's trainable_token_indices,
  and the adapter saves only those rows. A layer lora.modules_to_save already trains whole needs none;
  with tied embeddings the head follows the embedding's rows (peft ties them). A LoRA target on such a
  layer is refused: LoRA and trainable rows on one layer have no defined merge.
- The adapter init is seeded (train.seed) right before peft creates it; `use_cache` is always off
  (training never reuses keys/values, and transformers only detects padding-free packed rows from
  position_ids when no cache is passed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from reprotune.config.sections import LoraConfig, QuantConfig, TrainConfig
from reprotune.errors import BadInput
from reprotune.hardware import Capabilities
from reprotune.loading import added_token_ids, matches
from reprotune.quant import load_kwargs


def load_trainable(
    base_dir: Path,
    quant: QuantConfig,
    lora: LoraConfig,
    train: TrainConfig,
    caps: Capabilities,
    attn: str,
    sharded: bool = False,
    distributed_config=None,
):
    """The base from `base_dir` with a fresh LoRA adapter; only the adapter requires grad.

    `attn` is the attn_implementation to load (caps' resolved one, or attention.NAME for packed rows).
    `sharded`: FSDP will shard the base (4-bit storage in the compute dtype); `distributed_config`: transformers
    shards it while loading (sharding.load_config), and the adapter is added to the sharded base.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    # under DDP each process owns one GPU
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if caps.device == "cuda" else "cpu"
    kwargs = load_kwargs(quant, caps.compute_dtype, device, sharded)
    if distributed_config is not None:
        kwargs["distributed_config"] = distributed_config
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation=attn, **kwargs)
    model.config.use_cache = False
    if quant.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    set_seed(train.seed)  # LoRA A matrices are drawn from the global RNG
    return get_peft_model(model, adapter_config(model, lora, added_token_ids(base_dir)))


def adapter_config(model, lora: LoraConfig, added_ids: Sequence[int] = ()):
    """peft's LoraConfig for `lora` on `model`; `added_ids`: token ids whose embedding rows must be trained."""
    from peft import LoraConfig

    head = output_head_name(model)
    targets = linear_leaf_names(model, exclude=head) if lora.target_linear else list(lora.target_modules)
    check_names(model, targets, "lora.target_modules")
    saved = list(lora.modules_to_save) if lora.modules_to_save else None
    if saved:
        check_names(model, saved, "lora.modules_to_save")
    check_untied(model, targets, "lora.target_modules")
    check_untied(model, saved or [], "lora.modules_to_save")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=saved,
        trainable_token_indices=token_rows(model, targets, saved or [], list(added_ids)),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def token_rows(model, targets: list[str], saved: list[str], ids: list[int]) -> dict[str, list[int]] | None:
    """peft's trainable_token_indices for the added `ids`: {layer name: ids} for the input embedding and the
    output head (only the embedding when tied: peft ties the head's rows to it), less what `saved` trains
    whole; None when nothing is left."""
    if not ids:
        return None
    layers = [module_name(model, model.get_input_embeddings())]
    if not model.config.get_text_config().tie_word_embeddings:
        layers.append(output_head_name(model))
    rows = {layer: ids for layer in layers if not matches(layer, saved)}
    for layer in rows:
        if matches(layer, targets):
            raise BadInput(
                f"lora.target_modules: {layer!r} gets rows for the tokens added to the vocabulary (base.tokens / "
                "base.special_tokens); LoRA on it as well has no defined merge. Leave it out, or list it in "
                "lora.modules_to_save to train it whole"
            )
    return rows or None


def check_untied(model, entries: list[str], key: str) -> None:
    """With tied embeddings (tie_word_embeddings: one matrix is both the input embedding and the output head)
    an adapter or a trained copy of either would update one use and not the other in training, then both in
    the merged checkpoint, which stores the matrix once: the shipped model would not be the trained one."""
    if not model.config.get_text_config().tie_word_embeddings:
        return
    tied = {output_head_name(model), module_name(model, model.get_input_embeddings())}
    for entry in entries:
        if any(matches(name, [entry]) for name in tied):
            raise BadInput(
                f"{key}: {entry!r} is tied to the {'output head' if 'embed' in entry else 'input embeddings'} "
                "(the base has tie_word_embeddings: true); training it alone would untie what the merged model "
                "stores once. Leave it out (lora.target_linear already skips the output head)"
            )


def output_head_name(model) -> str:
    return module_name(model, model.get_output_embeddings())


def module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


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
        if not any(matches(name, [entry]) for name in names):
            raise BadInput(
                f"{key}: {entry!r} matches no module of the base model "
                f"(linear layers: {', '.join(linear_leaf_names(model, output_head_name(model)))})"
            )

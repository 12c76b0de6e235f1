"""How the processes of a run share the model: alone, DDP (each holds it whole) or FSDP (each holds 1/N).

train.distributed picks ddp or fsdp; one process is neither. No sharding logic lives here: FSDP is torch's
FSDP2 (`fully_shard`, parameters as DTensor shards) applied by an existing engine, chosen by device:
- CUDA: accelerate's FSDP plugin, through the Trainer's `fsdp` / `fsdp_config` arguments (`trainer_arguments`).
  It wraps each decoder layer, shards QLoRA's 4-bit weights too (bitsandbytes, with the quant storage in the
  compute dtype so every shard of a unit has one dtype: quant.py) and writes sharded checkpoints.
- CPU: accelerate enables FSDP on accelerator devices only (on CPU it wraps the model in DDP), so the base is
  sharded while loading by transformers' own FSDP2 path (`from_pretrained(distributed_config=...)`,
  `load_config`), one unit per decoder layer, as torchtune applies fully_shard itself. peft's adapter is added
  after it and stays replicated (a few MB); the Trainer broadcasts it from rank 0 and averages its gradients.
  bitsandbytes shards 4-bit weights on CUDA only: FSDP with quant.load_in_4bit on CPU is refused (exit 2), as
  is lora.modules_to_save there (peft would deepcopy an already sharded module).
`describe` reads what actually ran from the wrapped model, not from params: metrics/train.json's
`distributed` and `local_parameter_share` (the base's parameter elements this process holds).
`adapter_state` gathers the adapter whole on every process, so rank 0 saves one ordinary peft folder.

Trade-offs: each forward and backward all-gathers a layer's weights (communication per step instead of
DDP's one gradient all-reduce), so FSDP pays off when the base does not fit a device, not before; on CPU
the replicated adapter's optimizer state is checkpointed whole by rank 0 (it is identical on every rank).
"""

from __future__ import annotations

import re
from pathlib import Path

from reprotune.config.sections import FsdpConfig, LoraConfig, QuantConfig, TrainConfig
from reprotune.errors import BadInput
from reprotune.quant import weightless_model


def mode(cfg: TrainConfig, world_size: int) -> str:
    """none | ddp | fsdp: what `world_size` processes do with train.distributed (auto is ddp)."""
    if world_size == 1:
        return "none"
    return "fsdp" if cfg.distributed == "fsdp" else "ddp"


def require_shardable(quant: QuantConfig, lora: LoraConfig, device: str) -> None:
    """What FSDP cannot run here is refused before anything is loaded (exit 2): a 4-bit base off CUDA, and on
    CPU whole modules trained beside the adapter (peft copies them, and the base is already sharded)."""
    if device == "cuda":
        return
    if lora.modules_to_save:
        raise BadInput(
            f"lora.modules_to_save {list(lora.modules_to_save)} under train.distributed: fsdp on CPU: the base is "
            "sharded while it loads, and peft cannot copy a sharded module to train it whole. Set "
            "lora.modules_to_save: null (LoRA on the linear layers) or train.distributed: ddp."
        )
    if quant.load_in_4bit:
        raise BadInput(
            "train.distributed: fsdp with quant.load_in_4bit: true needs CUDA GPUs: bitsandbytes shards 4-bit "
            "weights only there. On CPU, set quant.load_in_4bit: false (LoRA on a sharded full-precision base) "
            "or train.distributed: ddp (each process holds the whole 4-bit base)."
        )


def layer_class(base_dir: Path, fsdp: FsdpConfig, trust_remote_code: bool) -> tuple[str, list[str]]:
    """The decoder layer class (fsdp.transformer_layer_cls_to_wrap, or the one the model names itself) and the
    names of the modules of that class, found on a weightless copy of the model."""
    model = weightless_model(base_dir, trust_remote_code)
    classes = {type(m).__name__ for m in model.modules()}
    named = list(getattr(model, "_no_split_modules", None) or [])
    wanted = fsdp.transformer_layer_cls_to_wrap or next((c for c in named if c in classes), None)
    if wanted is None or wanted not in classes:
        given = f"got {wanted!r}; " if wanted else "the model names no decoder layer class; "
        raise BadInput(
            f"train.fsdp.transformer_layer_cls_to_wrap: {given}set it to the model's decoder layer class, one of "
            f"{sorted(c for c in classes if 'Layer' in c) or sorted(classes)}"
        )
    return wanted, [name for name, m in model.named_modules() if type(m).__name__ == wanted]


def trainer_arguments(fsdp: FsdpConfig, layer_cls: str) -> dict:
    """TrainingArguments for accelerate's FSDP plugin (CUDA)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": fsdp.version,
            "auto_wrap_policy": fsdp.auto_wrap_policy,
            "transformer_layer_cls_to_wrap": [layer_cls],
            "reshard_after_forward": fsdp.reshard_after_forward,
            "cpu_offload": fsdp.offload_params,
            "cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
            "state_dict_type": fsdp.state_dict_type,
            "activation_checkpointing": fsdp.activation_checkpointing,
        },
    }


def load_config(fsdp: FsdpConfig, layer_names: list[str], world_size: int):
    """transformers' DistributedConfig that shards the base over all `world_size` processes while it loads
    (CPU): one FSDP unit per decoder layer (`layer_names`, as the plan's wildcard patterns)."""
    from transformers.distributed import DistributedConfig

    style = "free_full_weight" if fsdp.reshard_after_forward else "keep_full_weight"
    plan = {re.sub(r"\.\d+(?=\.|$)", ".*", name): style for name in layer_names}
    return DistributedConfig(fsdp_size=world_size, fsdp_plan=plan, fsdp_cpu_offload=fsdp.offload_params)


def describe(model) -> dict:
    """What ran, read from the (wrapped) model: `distributed` (fsdp: parameters are DTensor shards; ddp: a
    DistributedDataParallel; none) and `local_parameter_share`, this process's share of the base's (frozen)
    parameter elements: about 1/N under FSDP over N processes, 1.0 otherwise."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    params = list(inner.parameters())
    base = [p for p in params if not p.requires_grad]
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in base)
    total = sum(p.numel() for p in base)
    if any(isinstance(p, DTensor) for p in params):
        kind = "fsdp"
    else:
        kind = "ddp" if isinstance(model, DistributedDataParallel) else "none"
    return {"distributed": kind, "local_parameter_share": held / total if total else 1.0}


def adapter_state(model) -> dict:
    """The adapter's (trainable) tensors whole, to be saved by rank 0; every process must call it (gathering a
    sharded tensor is a collective). The frozen base is left out: peft would otherwise gather all of it."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad
    }

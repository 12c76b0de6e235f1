"""The 4-bit base of QLoRA: how it is loaded (train, evaluate's "as trained") and what it rounds weights to
(merge.fold_into: dequantized). One owner, so the three agree on every quantization setting.

- `compute_dtype_setting` / `training_compute_dtype`: the dtype training computes in (the 4-bit compute
  dtype setting under QLoRA, else `auto`, resolved for this machine by hardware.resolve).
- `bnb_config`: transformers' BitsAndBytesConfig from the quant section and the resolved compute dtype.
  Quant storage `auto` is uint8, or the compute dtype when FSDP shards the 4-bit weights (CUDA).
- `load_kwargs`: from_pretrained's arguments for the base as training loads it; `load_as_trained`: the
  adapter on that base (evaluate's "as trained", `reprotune chat --adapter`).
- `quantized_names`: the weights bitsandbytes quantizes when loading: every nn.Linear but the output
  head (transformers keeps the head in full precision), found on a weightless copy of the model
  (`weightless_model`, also what FSDP finds the decoder layers on).
- `round_trip`: a weight as the 4-bit model computes with it: quantized by bitsandbytes' own
  Params4bit (same quant type, block size, double quantization and storage as loading uses), then
  dequantized to the compute dtype. Exactly the matrix a Linear4bit multiplies by in training.
"""

from __future__ import annotations

from pathlib import Path

from reprotune.config.sections import QuantConfig, TrainConfig
from reprotune.hardware import DTYPE_NAMES, device_type, resolve

STORAGE_DTYPES = {"auto": "uint8", "uint8": "uint8", **DTYPE_NAMES}


def compute_dtype_setting(quant: QuantConfig) -> str:
    """hardware.resolve's compute_dtype argument: bnb_4bit_compute_dtype under QLoRA, else auto."""
    return quant.bnb_4bit_compute_dtype if quant.load_in_4bit else "auto"


def training_compute_dtype(quant: QuantConfig, train: TrainConfig) -> str:
    """The torch dtype name training computes in on this machine (float32 on CPU)."""
    return resolve(train.bf16, train.fp16, "sdpa", compute_dtype_setting(quant)).compute_dtype


def load_kwargs(quant: QuantConfig, compute_dtype: str, device: str, sharded: bool = False) -> dict:
    """from_pretrained arguments for the base as training loads it: in `compute_dtype`, and under QLoRA
    quantized to 4 bits on `device` (bitsandbytes quantizes where the weights land); `sharded`: FSDP will
    shard it."""
    import torch

    kwargs = {"dtype": getattr(torch, compute_dtype)}
    if quant.load_in_4bit:
        kwargs |= {"quantization_config": bnb_config(quant, compute_dtype, sharded), "device_map": {"": device}}
    return kwargs


def storage_dtype(setting: str, compute_dtype: str, sharded: bool) -> str:
    """The torch dtype name packed 4-bit weights are stored in. auto: uint8, but the compute dtype when FSDP
    shards them (a sharding unit flattens its parameters together, so they must share one dtype; the values
    are the same bytes either way)."""
    if setting == "auto" and sharded:
        return compute_dtype
    return STORAGE_DTYPES[setting]


def bnb_config(quant: QuantConfig, compute_dtype: str, sharded: bool = False):
    """BitsAndBytesConfig for 4-bit loading; `compute_dtype` is a torch dtype name (float32, bfloat16...)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, storage_dtype(quant.bnb_4bit_quant_storage, compute_dtype, sharded)),
    )


def weightless_model(model_dir: Path, trust_remote_code: bool = False):
    """The model of `model_dir`'s config with its parameters on the meta device: its structure, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def quantized_names(model_dir: Path, trust_remote_code: bool = False) -> set[str]:
    """Tensor names (e.g. model.layers.0.mlp.up_proj.weight) that 4-bit loading quantizes."""
    import torch

    model = weightless_model(model_dir, trust_remote_code)
    head = model.get_output_embeddings()
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def round_trip(weight, quant: QuantConfig, compute_dtype: str, device: str):
    """`weight` (out, in) quantized as 4-bit loading does, then dequantized: (out, in) in `compute_dtype`."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Params4bit

    dtype = getattr(torch, compute_dtype)
    param = Params4bit(
        weight.to(dtype),  # loading casts to the compute dtype before bitsandbytes quantizes
        requires_grad=False,
        compress_statistics=quant.bnb_4bit_use_double_quant,
        quant_type=quant.bnb_4bit_quant_type,
        quant_storage=getattr(torch, STORAGE_DTYPES[quant.bnb_4bit_quant_storage]),
    ).to(device)  # quantizes on the way
    return dequantize_4bit(param.data, param.quant_state).to(dtype).reshape(weight.shape)


def load_as_trained(base_dir: Path, adapter_dir: Path, quant: QuantConfig, train: TrainConfig, trust_remote_code: bool):
    """The adapter on the base as training loaded it: 4-bit (quant section) in the training's compute dtype
    (evaluate's "as trained", `reprotune chat --adapter`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(quant, training_compute_dtype(quant, train), device_type())
    base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trust_remote_code, **kwargs)
    model = PeftModel.from_pretrained(base, adapter_dir).to(device_type()).eval()
    if quant.load_in_4bit:
        from bitsandbytes.nn import Linear4bit

        for module in model.modules():
            # bitsandbytes' CPU inference path (eval mode, on CPUs with AVX512-BF16) repacks the 4-bit weights
            # for a bf16 kernel, which rounds differently from training's dequantize-then-matmul in the compute
            # dtype. The flag is set on bitsandbytes' own 4-bit layers only (they have no children and no
            # train-only behaviour), never through .train(): peft's LoRA wrapper would switch its dropout on.
            if isinstance(module, Linear4bit):
                module.training = True
    return model

"""Merge: fold the LoRA adapter into a 16/32-bit copy of the base, tensor by tensor, and prove it.

Features
- dtype (merge.dtype): auto = bf16 on CUDA sm80+, else the base's stored dtype (fp32 if none is
  recorded). Never 4-bit: the merge reloads the unquantized base checkpoint (QLoRA's 4-bit copy
  only ever lived in training memory), and a base stored quantized is refused as bad input.
- Fold into (merge.fold_into): QLoRA trains the adapter against the 4-bit weights, so the model
  that was trained is not base + adapter but round_trip(base) + adapter. `dequantized` folds the
  adapter into each weight that 4-bit loading quantized (every Linear but the output head) as the
  4-bit model computed with it (reprotune.quant.round_trip: bitsandbytes' own quantize, then
  dequantize): the shipped model is the trained one up to rounding. `original` folds it into the
  base's 16/32-bit weights, as peft's merge_and_unload does: the shipped model keeps the base's full
  precision, but its adapter was fitted to other weights. Without quant.load_in_4bit the two are
  the same. The evaluate stage measures both gaps (as trained vs as shipped).
- Streaming: the merged checkpoint is written one tensor at a time. A base tensor is read from its
  safetensors file with plain reads (no mmap, so weights already written never stay resident),
  the LoRA delta is added in fp32 (W += scale * B @ A; DoRA then rescales each output row to its
  learned magnitude), the result is cast to the merge dtype, appended to its output shard and
  freed. Peak memory is the adapter plus about three copies of the largest tensor (usually the
  embedding), whatever the model size; benchmarks/bench_merge.py measures it.
- Layout as `save_pretrained(safe_serialization=True)`: model.safetensors, or
  model-0000i-of-0000n.safetensors plus model.safetensors.index.json, split at
  export.max_shard_size by huggingface_hub's rule (a new shard when the next tensor would overflow;
  a tensor larger than the limit alone). Tensors go in natural name order (layers.2 before
  layers.10), so a layer's tensors sit together. No timestamps or paths: merging twice gives
  byte-identical files.
- Other files: the base's tokenizer, chat template and generation config (the adapter folder's
  tokenizer files win when it has them: training may have saved an extended tokenizer);
  config.json with `dtype` set to the merge dtype.
- Adapters supported: LoRA on Linear and Embedding layers, rsLoRA, rank_pattern/alpha_pattern,
  DoRA on Linear, modules_to_save (whole replacement tensors), trainable_token_indices (the rows of
  tokens added to the vocabulary: the saved rows replace the base's rows at those ids, as peft's
  merge does; a tied head follows, the merged checkpoint storing the matrix once). Any other adapter
  tensor or setting is refused before anything is written.
- Verification (`verify`): on merge.verify_sequences validation sequences (their first 256 tokens;
  a fixed token sequence when there is no validation split) the merged checkpoint, read back from
  disk, must give the logits of PeftModel(base, adapter) in the same dtype:
  max |delta| <= max(rtol x max(1, max |reference logit|), 2 x noise floor). rtol is 1e-4 for fp32,
  2e-2 for bf16, 5e-3 for fp16. The noise floor is measured, not guessed: peft's own merge (what
  merge_and_unload does) folds the adapter into each base weight of the reference as it is read, and
  the max |delta| between those logits and the unmerged ones is what merging costs in this dtype. In
  fp32 it is ~1e-6 (the rtol term rules); in bf16 it grows with depth (a random 20-layer model:
  ~2% of the logit scale, from 8-bit mantissas rounding differently on the two paths), which a
  fixed bf16 rtol cannot cover. A merge error smaller than twice peft's own is not detectable in
  that dtype. A failure raises, so the stage's atomic folder leaves nothing.
- Streamed verification: the models are transformers' own (AutoModelForCausalLM.from_config) and
  peft's own (PeftModel.from_pretrained) built without base weights: each parameter is a NaN
  placeholder of one element. Forward hooks read a module's weights from its safetensors file just
  before the module runs and drop them after, so a forward holds one module's weights (the largest is
  the embedding or lm_head) and the activations of the verify tokens. Three models: the reference
  (LoRA unmerged, peft's forward), the merged checkpoint, and the noise floor (peft's merge applied
  layer by layer). Each runs its decoder once on the whole batch (one read of its checkpoint), then
  its LM head on one sequence at a time, so only two sequences' logits are ever held. In fp32 the
  reference and noise-floor logits are bit-identical to PeftModel and merge_and_unload on a fully
  loaded base.

Trade-offs
- Memory, from benchmarks/bench_merge.py on a 2-core AMD EPYC VM without GPU (torch 2.13,
  transformers 5.24, peft 0.21), random 322M-param bf16 Llama (0.64 GB on disk, 4 shards, vocab
  32k), 4 verify sequences of 256 tokens: the whole stage peaks at 0.67-0.68 GB RSS = 1.04-1.05 x
  the checkpoint, of which the import floor (torch, transformers, peft) is 0.44 GB = 0.69 x; the
  streaming merge alone is 0.24 x above the floor and verification peaks about as high as it.
  PeftModel merge_and_unload + save_pretrained: 1.78 x; this module's earlier whole-model
  verification: 2.41 x.
- Time: every verification model reads its checkpoint once for the batch and its lm_head once per
  sequence (from the page cache, usually), and freed heap memory goes back to the OS after each
  module (malloc_trim): 19-21 s for the whole stage in that benchmark, 13 s with whole models. On
  CUDA the weights go to the GPU a module at a time: GPU memory is one module, at the cost of copying
  the model to the GPU three times.
- The reference runs in the merge dtype, not fp32: it checks the merge, not bf16's own rounding.
  Its LoRA weights are used as saved (fp32 from training), as peft assigns them to a weightless
  base; PeftModel on a bf16 base first rounds them to bf16 (logits then differ by ~the noise floor).
- The LM head runs outside the CausalLM forward (get_decoder, then get_output_embeddings): exact
  for Llama, Qwen2 and Mistral, whose forward does nothing after it; a model that rescales or
  soft-caps its logits is compared before that step (the weights are checked all the same).
- The hooks need each weight to be used inside its own module's forward, as transformers' Llama,
  Qwen2 and Mistral do; a model that reads a weight elsewhere meets a NaN placeholder and fails
  verification rather than passing it.
- Only safetensors are read and written; pickled weights can run code and are refused upstream.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reprotune import layout
from reprotune.config import Params
from reprotune.errors import BadInput
from reprotune.hardware import DTYPE_NAMES, cuda_supports_bf16, device_type, peak_rss_bytes, release_freed_memory
from reprotune.io import write_json
from reprotune.loading import copy_tokenizer_files, is_tokenizer_file, matches, read_config, stored_dtype
from reprotune.packed import read_val_sequences
from reprotune.quant import quantized_names, round_trip, training_compute_dtype
from reprotune.tensors import INDEX_NAME, WEIGHTS_NAME, natural_key, read_index, read_tensor, write_safetensors

log = logging.getLogger(__name__)

RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
NOISE_MARGIN = 2.0  # x peft's own merge noise (see Verification above)
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_PREFIX = "base_model.model."  # peft's prefix on every saved adapter tensor
# Files of the base folder not copied as they are: weights are rewritten, config.json gets the new
# dtype, and the base's provenance record describes the base, not the merge.
NOT_COPIED = re.compile(r".*\.safetensors|model\.safetensors\.index\.json|config\.json|reprotune_base\.json")
# Any value of these adapter settings other than the one listed changes the merge math.
PLAIN_SETTINGS = {
    "peft_type": "LORA",
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "target_parameters": None,
    "layer_replication": None,
}
FALLBACK_SEQUENCE_LEN = 64
# A base weight as the merge folds the adapter into it: (tensor name, weight as stored) -> weight
BaseWeight = Callable[[str, torch.Tensor], torch.Tensor]
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}  # decimal, as save_pretrained's max_shard_size
# Verification holds two sequences' logits (tokens x vocab, merge dtype) at a time: 2 x 256 tokens of a
# 128k vocabulary in bf16 is 0.13 GB, whole 4k-token sequences would be 2 GB. Every weight is already
# exercised by the first tokens.
VERIFY_MAX_TOKENS = 256


@dataclass(frozen=True)
class MergeInputs:
    """The merge stage's input folders (defaults: the pipeline's)."""

    base: Path = layout.BASE
    adapter: Path = layout.ADAPTER
    packed: Path = layout.PACKED
    """Validation sequences for the verification (none: a fixed token sequence)."""


# ----------------------------------------------------------------------------- dtype


def resolve_dtype(name: str, base_dir: Path) -> torch.dtype:
    """The merge dtype for merge.dtype `name` (auto: bf16 on CUDA sm80+, else the base's stored dtype)."""
    config = read_config(base_dir)
    if "quantization_config" in config:
        raise BadInput(
            f"{Path(base_dir) / 'config.json'}: the base checkpoint is stored quantized "
            "(quantization_config); the merge needs its 16/32-bit weights: set base.model to the "
            "unquantized checkpoint and rerun the base stage"
        )
    if name != "auto":
        return getattr(torch, DTYPE_NAMES[name])
    if cuda_supports_bf16():
        return torch.bfloat16
    return getattr(torch, stored_dtype(config) or "float32")


# ----------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class LoraDelta:
    A: torch.Tensor
    """(r, in) for Linear; (r, num_embeddings) for Embedding."""
    B: torch.Tensor
    """(out, r) for Linear; (embedding_dim, r) for Embedding."""
    scale: float
    embedding: bool
    magnitude: torch.Tensor | None = None
    """DoRA: (out,) learned row norms."""

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight, in fp32; `weight` is the base weight (out, in) / (num_embeddings, dim)."""
        delta = self.scale * (self.B.float() @ self.A.float())  # (out, r) @ (r, in) -> (out, in)
        merged = weight.float() + (delta.T if self.embedding else delta)
        if self.magnitude is None:
            return merged
        # DoRA: each output row of W + dW scaled to its learned norm (peft's merge, dim=1 norms)
        return (self.magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged


@dataclass(frozen=True)
class Adapter:
    deltas: dict[str, LoraDelta]
    """Keyed by the base tensor name they change, e.g. model.layers.0.self_attn.q_proj.weight."""
    replacements: dict[str, torch.Tensor]
    """modules_to_save: base tensor name -> the trained tensor that replaces it."""
    base_layers: dict[str, torch.Tensor]
    """Base weights saved with the adapter (peft's save_embedding_layers): used instead of the base
    checkpoint's tensor, before the delta is added, as PeftModel.from_pretrained does."""
    rows: dict[str, tuple[list[int], torch.Tensor]]
    """trainable_token_indices: base tensor name -> (token ids, their trained rows), which replace the base's."""

    def row_replaced(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with its trained token rows put in (a copy), or `weight` itself when it has none."""
        if name not in self.rows:
            return weight
        ids, values = self.rows[name]
        return weight.index_copy(0, torch.tensor(ids), values.to(weight.dtype))


LORA_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A_emb",
    ".lora_embedding_B": "B_emb",
    ".lora_magnitude_vector": "magnitude",
}
BASE_LAYER = ".base_layer.weight"
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # peft saves the trained rows themselves, not deltas


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter's tensors grouped per base tensor, with peft's scaling; refuses what it cannot merge."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    odd = {k: config.get(k) for k, v in PLAIN_SETTINGS.items() if config.get(k, v) not in (v, [], {})}
    token_indices = config.get("trainable_token_indices") or {}
    if not isinstance(token_indices, dict):  # a bare list targets a layer only the model knows
        odd["trainable_token_indices"] = token_indices
    if odd:
        raise ValueError(f"adapter settings the merge does not support: {odd}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    base_layers: dict[str, torch.Tensor] = {}
    rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    for key, tensor in load_file(Path(adapter_dir) / ADAPTER_WEIGHTS).items():
        if not key.startswith(ADAPTER_PREFIX):
            raise ValueError(f"unexpected adapter tensor {key!r} (no {ADAPTER_PREFIX!r} prefix)")
        key = key[len(ADAPTER_PREFIX) :]
        suffix = next((s for s in LORA_PARTS if key.endswith(s)), None)
        if key.endswith(BASE_LAYER):
            base_layers[key[: -len(BASE_LAYER)] + ".weight"] = tensor
        elif key.endswith(TOKEN_ROWS):
            module = key[: -len(TOKEN_ROWS)]
            ids = _token_ids(module, token_indices)
            if tensor.shape[0] != len(ids):  # refused here, before a shard is written
                raise ValueError(f"adapter token rows of {module!r}: {tensor.shape[0]} rows for {len(ids)} token ids")
            rows[f"{module}.weight"] = (ids, tensor)
        elif suffix is None:
            replacements[key] = tensor  # a modules_to_save copy, saved under the base tensor's name
        else:
            parts.setdefault(key[: -len(suffix)], {})[LORA_PARTS[suffix]] = tensor
    deltas = {f"{module}.weight": _delta(module, p, config) for module, p in sorted(parts.items())}
    mixed = sorted(set(rows) & (set(deltas) | set(replacements)))
    if mixed:
        raise ValueError(f"adapter tensors with both trained token rows and LoRA or a full copy: {mixed}")
    return Adapter(deltas, replacements, base_layers, rows)


def _token_ids(module: str, token_indices: dict[str, list[int]]) -> list[int]:
    """The token ids of `module`'s saved rows: the trainable_token_indices entry naming it (fully or as a
    dotted suffix, peft's rule)."""
    ids = [v for k, v in token_indices.items() if matches(module, [k])]
    if len(ids) != 1:
        raise ValueError(f"adapter token rows of {module!r}: {len(ids)} trainable_token_indices entries name it")
    return ids[0]


def _delta(module: str, parts: dict[str, torch.Tensor], config: dict) -> LoraDelta:
    embedding = "A_emb" in parts
    A, B = (parts.get("A_emb"), parts.get("B_emb")) if embedding else (parts.get("A"), parts.get("B"))
    if A is None or B is None:
        raise ValueError(f"adapter module {module!r} lacks lora_A or lora_B: {sorted(parts)}")
    r = A.shape[0]  # rank_pattern already shaped the tensors
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key rule
            alpha = value
            break
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraDelta(A, B, scale, embedding, parts.get("magnitude"))


# ----------------------------------------------------------------------------- streaming merge


def parse_size(text: str) -> int:
    """Bytes in an export.max_shard_size such as 500MB or 1.5GB (the schema checked the form)."""
    return int(float(text[:-2]) * SIZE_UNITS[text[-2:]])


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Split tensors (in the given order) into shards of at most `max_bytes`, as huggingface_hub does."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + ([current] if current else [])


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def as_stored(name: str, weight: torch.Tensor) -> torch.Tensor:
    return weight


def fold_target(params: Params, base_dir: Path) -> BaseWeight:
    """merge.fold_into as a BaseWeight: the stored weights, or the 4-bit model's dequantized ones."""
    if params.merge.fold_into == "original" or not params.quant.load_in_4bit:
        return as_stored
    compute = training_compute_dtype(params.quant, params.train)
    names = quantized_names(base_dir, params.base.trust_remote_code)
    device = device_type()

    def dequantized(name: str, weight: torch.Tensor) -> torch.Tensor:
        return round_trip(weight, params.quant, compute, device).cpu() if name in names else weight

    return dequantized


def merge_weights(
    base_dir: Path,
    adapter: Adapter,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    base_weight: BaseWeight = as_stored,
) -> dict:
    """Write the merged safetensors shards (+ index) into `out_dir`; returns counts. Each base tensor passes
    through `base_weight` before the adapter is folded into it."""
    refs = read_index(base_dir)
    changed = set(adapter.deltas) | set(adapter.replacements) | set(adapter.base_layers) | set(adapter.rows)
    unknown = sorted(changed - set(refs))
    if unknown:
        raise ValueError(f"adapter tensors without a base tensor to merge into: {unknown[:5]}")

    def out_dtype(name: str) -> torch.dtype:
        return dtype if refs[name].dtype.is_floating_point else refs[name].dtype

    names = sorted(refs, key=natural_key)
    sizes = {n: refs[n].numel * out_dtype(n).itemsize for n in names}
    plan = plan_shards(sizes, max_shard_bytes)
    files = shard_names(len(plan))
    with ExitStack() as stack:
        handles = {f: stack.enter_context(open(f, "rb")) for f in sorted({r.file for r in refs.values()})}

        def merged(name: str) -> torch.Tensor:
            if name in adapter.replacements:
                return adapter.replacements[name].to(dtype)
            raw = adapter.base_layers.get(name)
            if raw is None:
                raw = base_weight(name, read_tensor(refs[name], handles[refs[name].file]))
            if name in adapter.deltas:
                return adapter.deltas[name].apply(raw).to(dtype)
            return adapter.row_replaced(name, raw.to(out_dtype(name)))

        for file, shard in zip(files, plan):
            specs = [(n, out_dtype(n), refs[n].shape) for n in shard]
            write_safetensors(Path(out_dir) / file, specs, (merged(n) for n in shard))
    if len(plan) > 1:
        weight_map = {n: f for f, shard in zip(files, plan) for n in shard}
        total_params = sum(refs[n].numel for n in names)
        write_json(Path(out_dir) / INDEX_NAME, {
            "metadata": {"total_parameters": total_params, "total_size": sum(sizes.values())},
            "weight_map": weight_map})  # fmt: skip
    return {"shards": len(plan), "tensors": len(names), "merged_tensors": len(adapter.deltas),
            "replaced_tensors": len(adapter.replacements), "token_row_tensors": len(adapter.rows)}  # fmt: skip


def copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Tokenizer, chat template, generation config (and any custom code) beside the weights."""
    for p in sorted(Path(base_dir).iterdir()):
        if p.is_file() and not NOT_COPIED.fullmatch(p.name):
            shutil.copyfile(p, Path(out_dir) / p.name)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        for p in Path(out_dir).iterdir():  # a full tokenizer replaces the base's, not mixes with it
            if is_tokenizer_file(p.name):
                p.unlink()
        copy_tokenizer_files(adapter_dir, out_dir)
    config = read_config(base_dir)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(Path(out_dir) / "config.json", config)


def merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    base_weight: BaseWeight = as_stored,
) -> dict:
    """The complete merged model folder in the existing empty `out_dir` (not yet verified)."""
    adapter = read_adapter(adapter_dir)
    counts = merge_weights(base_dir, adapter, out_dir, dtype, max_shard_bytes, base_weight)
    copy_side_files(base_dir, adapter_dir, out_dir, dtype)
    return counts


# ----------------------------------------------------------------------------- streamed models


def hollow_model(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, dict]:
    """transformers' model for `model_dir`'s config.json with no weights in memory, and where each
    weight lives: {placeholder parameter: tensor name in the checkpoint}. A placeholder is one NaN
    broadcast to the parameter's shape (one element of memory) in `dtype`, on the stage's device, so a
    weight that is never streamed in poisons the logits instead of passing unnoticed. Buffers (rotary
    frequencies) are real: transformers computes them from the config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    device = device_type()
    with torch.device(device), init_empty_weights():  # parameters on meta, buffers on the device
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # under init_empty_weights, tied weights (tie_word_embeddings) come out as two
    aliases: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one parameter, two names
        aliases.setdefault(p, []).append(name)
    stored = read_index(model_dir)
    sources = {}
    for module_name, module in model.named_modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            names = [f"{module_name}.{attr}", *aliases[p]]  # its own name first, then a tied one
            name = next((n for n in names if n in stored), None)
            if name is None:
                raise RuntimeError(f"{model_dir}: no tensor for parameter {names[0]} in the checkpoint")
            placeholder = torch.full((), math.nan, dtype=dtype, device=device).expand(p.shape)
            setattr(module, attr, nn.Parameter(placeholder, requires_grad=False))
            sources[getattr(module, attr)] = name
    return model.eval(), sources


def hollow_peft_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, trust_remote_code: bool):
    """PeftModel(base, adapter) as a hollow model (see `hollow_model`): the adapter is in memory, the base
    weights are placeholders. Returns the model and its placeholders' sources."""
    from peft import PeftModel

    base, sources = hollow_model(base_dir, dtype, trust_remote_code)
    # low_cpu_mem_usage: peft assigns the saved tensors instead of copying them into the placeholders
    model = PeftModel.from_pretrained(base, adapter_dir, low_cpu_mem_usage=True).eval()
    _cast_non_adapter_weights(model, dtype)
    return model, sources


def _cast_non_adapter_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Assigned tensors keep their stored dtype. On a base loaded in `dtype`, peft would have copied the
    base weights saved with the adapter and the modules_to_save copies into `dtype` parameters (only the
    LoRA weights keep their own dtype): do the same, or fp32 activations would meet bf16 weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = {
        p
        for m in model.modules()
        if isinstance(m, BaseTunerLayer)
        for part in m.adapter_layer_names
        for p in getattr(m, part).parameters()
    }
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype and p not in lora:
                setattr(module, attr, nn.Parameter(p.to(dtype), requires_grad=False))


@contextmanager
def streamed(
    model: nn.Module, sources: dict, model_dir: Path, merge_adapters: bool = False, base_weight: BaseWeight = as_stored
) -> Iterator[None]:
    """While open, each forward of `model` reads its weights from `model_dir` one module at a time:
    a hook loads a module's tensors (plain reads, see reprotune.tensors) just before it runs and puts
    the placeholders back after, so at most one module's weights are in memory. A LoRA-wrapped layer is
    one unit; with `merge_adapters` peft's own merge folds the adapter into its freshly read weight
    before it runs (and unmerges after: the model is unmerged again when the context closes). Each weight
    read passes through `base_weight` (merge.fold_into)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    refs = read_index(model_dir)
    units = _units(model, sources, BaseTunerLayer)
    held = {
        unit: _held_base_weights(unit, sources) for unit in units if merge_adapters and isinstance(unit, BaseTunerLayer)
    }

    def load(unit: nn.Module, _args) -> None:
        for owner, attr, placeholder in units[unit]:
            name = sources[placeholder]
            weight = base_weight(name, read_tensor(refs[name], handles[refs[name].file]))
            weight = weight.to(placeholder.device, placeholder.dtype)
            setattr(owner, attr, nn.Parameter(weight, requires_grad=False))
        if unit in held:
            for owner, attr, p in held[unit]:
                setattr(owner, attr, nn.Parameter(p.detach().clone(), requires_grad=False))
            unit.merge()

    def unload(unit: nn.Module, _args, _output) -> None:
        if unit in held:
            unit.unmerge()
            for owner, attr, p in held[unit]:
                setattr(owner, attr, p)
        for owner, attr, placeholder in units[unit]:
            setattr(owner, attr, placeholder)
        release_freed_memory()

    release_freed_memory()  # what ran before (the last logits) goes back before this model's weights come in
    with ExitStack() as stack:
        handles = {f: stack.enter_context(open(f, "rb")) for f in sorted({r.file for r in refs.values()})}
        for unit in units:
            stack.callback(unit.register_forward_pre_hook(load).remove)
            stack.callback(unit.register_forward_hook(unload).remove)
        yield


def _held_base_weights(tuner: nn.Module, sources: dict) -> list:
    """[(module, attribute, parameter)] of the base weights of a LoRA-wrapped layer that peft holds itself
    (an embedding saved with the adapter), not streamed. peft's merge writes into the base weight in place:
    these are merged as copies, so that unmerging cannot leave rounding behind in them."""
    base = tuner.get_base_layer()
    return [(base, attr, p) for attr, p in base.named_parameters(recurse=False) if p not in sources]


def _units(model: nn.Module, sources: dict, tuner_type: type) -> dict[nn.Module, list]:
    """{module to hook: [(owner module, attribute, placeholder)]}: every LoRA-wrapped layer (with the
    placeholders below it, if any: peft may hold the base weight itself), every other placeholder's
    own module."""
    tuners = {name: m for name, m in model.named_modules() if isinstance(m, tuner_type)}
    units: dict[nn.Module, list] = {m: [] for m in tuners.values()}
    for name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if p in sources:
                unit = next((t for prefix, t in tuners.items() if name.startswith(prefix + ".")), module)
                units.setdefault(unit, []).append((module, attr, p))
    return units


# ----------------------------------------------------------------------------- verification


def verify_inputs(packed_dir: Path, n: int, vocab_size: int) -> list[list[int]]:
    """Token ids of `n` validation sequences (their first VERIFY_MAX_TOKENS), or one fixed sequence
    without a val split."""
    seqs = [s.input_ids[:VERIFY_MAX_TOKENS] for s in read_val_sequences(packed_dir, n)]
    if seqs:
        return seqs
    # Fixed, spread over the vocabulary (7919 is prime, so ids cycle through all residues).
    return [[(i * 7919) % vocab_size for i in range(FALLBACK_SEQUENCE_LEN)]]


def token_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids right-padded with 0, and their (B, T) attention mask. Causal attention never lets
    a token see the padding after it, and every model sees the same batch."""
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in seqs]).unsqueeze(1)).long()
    return ids.to(device_type()), mask.to(device_type())


@torch.no_grad()
def hidden_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) output of the model's decoder (everything before the LM head) for a batch, on the CPU."""
    return model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.cpu()


@torch.no_grad()
def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(T, vocab) logits of one sequence's (T, H) hidden states through the model's own LM head (what
    the CausalLM forward of Llama, Qwen2 and Mistral does last), in the model's dtype, on the CPU."""
    return model.get_output_embeddings()(hidden.to(device_type())).cpu()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32, in place: one fp32 copy of `a`."""
    return float(a.float().sub_(b).abs_().max())


def nan_max(values: list[float]) -> float:
    """max(values), NaN when one is (Python's max skips a NaN that is not first)."""
    return float(torch.tensor(values).max())


def verify(
    inputs: MergeInputs,
    merged_dir: Path,
    dtype: torch.dtype,
    seqs: list[list[int]],
    trust_remote_code: bool,
    base_weight: BaseWeight = as_stored,
) -> dict:
    """Compare the logits of the merged checkpoint in `merged_dir` with PeftModel(base, adapter)'s, every
    model streamed from disk (the base's weights through `base_weight`, as the merge read them); raise
    when they differ by more than the tolerance. The decoders run on the
    whole batch; the LM heads one sequence at a time, so that only two sequences' logits are ever held
    (a batch's, B x T x vocab, would be the largest thing in memory)."""
    adapted, base_sources = hollow_peft_model(inputs.base, inputs.adapter, dtype, trust_remote_code)
    merged, merged_sources = hollow_model(merged_dir, dtype, trust_remote_code)
    models = {
        "reference": (adapted, base_sources, inputs.base, False, base_weight),
        "merged": (merged, merged_sources, merged_dir, False, as_stored),
        "peft-merged": (adapted, base_sources, inputs.base, True, base_weight),
    }  # the noise floor

    def run(name: str, fn: Callable, *args) -> torch.Tensor:
        model, sources, folder, merge_adapters, weights = models[name]
        with streamed(model, sources, folder, merge_adapters, weights):
            return fn(model, *args)

    hidden = {name: run(name, hidden_states, *token_batch(seqs)) for name in models}
    scales, diffs, noise = [], [], []
    for i, n in enumerate(map(len, seqs)):
        reference = run("reference", head_logits, hidden["reference"][i, :n])
        diffs.append(max_abs_diff(run("merged", head_logits, hidden["merged"][i, :n]), reference))
        noise.append(max_abs_diff(run("peft-merged", head_logits, hidden["peft-merged"][i, :n]), reference))
        scales.append(float(reference.abs().max()))
    max_abs, noise_floor, scale = nan_max(diffs), nan_max(noise), nan_max(scales)
    tolerance = max(RTOL[dtype] * max(1.0, scale), NOISE_MARGIN * noise_floor)
    result = {
        "max_abs_diff": max_abs,
        "logit_scale": scale,
        "rtol": RTOL[dtype],
        "noise_floor": noise_floor,
        "tolerance": tolerance,
        "verify_sequences": len(seqs),
        "verify_tokens": sum(map(len, seqs)),
    }
    if not max_abs <= tolerance:  # also catches NaN
        raise RuntimeError(
            f"merged logits differ from base+adapter logits: max |delta| {max_abs:.3g} "
            f"> tolerance {tolerance:.3g} ({dtype}); nothing was written"
        )
    return result


def merge_and_verify(params: Params, inputs: MergeInputs, out_dir: Path) -> dict:
    """Merge into the empty `out_dir` and verify it; returns the metrics of metrics/merge.json. Reads
    the merge section, export.max_shard_size, base.trust_remote_code, and (for fold_into: dequantized) the quant
    section and train.bf16 / train.fp16 (the compute dtype the 4-bit model ran in)."""
    dtype = resolve_dtype(params.merge.dtype, inputs.base)
    seqs = verify_inputs(inputs.packed, params.merge.verify_sequences, read_config(inputs.base)["vocab_size"])
    base_weight = fold_target(params, inputs.base)
    counts = merge(inputs.base, inputs.adapter, out_dir, dtype, parse_size(params.export.max_shard_size), base_weight)
    check = verify(inputs, out_dir, dtype, seqs, params.base.trust_remote_code, base_weight)
    log.info(
        "merged %d tensors into %d shard(s), %s; max |logit delta| %.3g <= %.3g",
        counts["merged_tensors"],
        counts["shards"],
        dtype,
        check["max_abs_diff"],
        check["tolerance"],
    )
    return {
        **counts,
        **check,
        "fold_into": "original" if base_weight is as_stored else "dequantized",
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_type(),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
    }

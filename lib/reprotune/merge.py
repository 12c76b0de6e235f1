"""Merge: fold the LoRA adapter into a 16/32-bit copy of the base, tensor by tensor, and prove it.

Features
- dtype (merge.dtype): auto = bf16 on CUDA sm80+, else the base's stored dtype (fp32 if none is
  recorded). Never 4-bit: the merge reloads the unquantized base checkpoint (QLoRA's 4-bit copy
  only ever lived in training memory), and a base stored quantized is refused.
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
  DoRA on Linear, modules_to_save (whole replacement tensors). Any other adapter tensor or setting
  is refused before anything is written.
- Verification (`verify`): on merge.verify_sequences validation sequences (their first 256 tokens;
  a fixed token sequence when there is no validation split) the merged checkpoint, loaded back from
  disk by transformers, must give the logits of PeftModel(base, adapter) in the same dtype:
  max |delta| <= max(rtol x max(1, max |reference logit|), 2 x noise floor). rtol is 1e-4 for fp32,
  2e-2 for bf16, 5e-3 for fp16. The noise floor is measured, not guessed: after the reference
  logits, peft's own merge_and_unload folds the adapter into the same in-memory model and the
  max |delta| between its logits and the unmerged ones is what merging costs in this dtype. In
  fp32 it is ~1e-6 (the rtol term rules); in bf16 it grows with depth (a random 20-layer model:
  ~2% of the logit scale, from 8-bit mantissas rounding differently on the two paths), which a
  fixed bf16 rtol cannot cover. A merge error smaller than twice peft's own is not detectable in
  that dtype. A failure raises, so the stage's atomic folder leaves nothing.

Trade-offs
- Verification holds one full model at a time (the reference, then the merged one), on CUDA when
  available: the stage's peak is about one model, while the merge itself stays near one tensor.
  benchmarks/bench_merge.py, 322M-param bf16 Llama (0.64 GB on disk), RSS above the import floor:
  streaming merge 0.11 x the checkpoint, whole stage 1.1 x, PeftModel merge_and_unload 0.95 x.
- The reference runs in the merge dtype, not fp32: it checks the merge, not bf16's own rounding,
  and never needs twice the memory of a 16-bit model.
- Only safetensors are read and written; pickled weights can run code and are refused upstream.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from reprotune.export.tensors import natural_key, read_index, read_tensor, write_safetensors
from reprotune.hardware import DTYPE_NAMES, cuda_supports_bf16, peak_rss_bytes
from reprotune.io import write_json

log = logging.getLogger(__name__)

RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
NOISE_MARGIN = 2.0  # x peft's own merge noise (see Verification above)
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_PREFIX = "base_model.model."  # peft's prefix on every saved adapter tensor
# Files of the base folder not copied as they are: weights are rewritten, config.json gets the new
# dtype, and the base's provenance record describes the base, not the merge.
NOT_COPIED = re.compile(r".*\.safetensors|model\.safetensors\.index\.json|config\.json|reprotune_base\.json")
TOKENIZER_FILES = re.compile(
    r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\..*"
    r"|vocab\.(json|txt)|merges\.txt|.*\.model|.*\.tiktoken"
)
# Any value of these adapter settings other than the one listed changes the merge math.
PLAIN_SETTINGS = {
    "peft_type": "LORA",
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
}
FALLBACK_SEQUENCE_LEN = 64
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}  # decimal, as save_pretrained's max_shard_size
# Verification keeps the reference logits (tokens x vocab, fp32) in memory: 4 x 256 tokens of a
# 128k vocabulary is 0.5 GB, while whole 4k-token sequences would be 8 GB. Every weight is already
# exercised by the first tokens.
VERIFY_MAX_TOKENS = 256


# ----------------------------------------------------------------------------- dtype


def resolve_dtype(name: str, base_dir: Path) -> torch.dtype:
    """The merge dtype for merge.dtype `name` (auto: bf16 on CUDA sm80+, else the base's stored dtype)."""
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ValueError("the base checkpoint is stored quantized; the merge needs a 16/32-bit base")
    if name != "auto":
        return getattr(torch, DTYPE_NAMES[name])
    if cuda_supports_bf16():
        return torch.bfloat16
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")  # v5 / v4 key


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


LORA_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A_emb",
    ".lora_embedding_B": "B_emb",
    ".lora_magnitude_vector": "magnitude",
}
BASE_LAYER = ".base_layer.weight"


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter's tensors grouped per base tensor, with peft's scaling; refuses what it cannot merge."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    odd = {k: config.get(k) for k, v in PLAIN_SETTINGS.items() if config.get(k, v) not in (v, [], {})}
    if odd:
        raise ValueError(f"adapter settings the merge does not support: {odd}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    base_layers: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(Path(adapter_dir) / ADAPTER_WEIGHTS).items():
        if not key.startswith(ADAPTER_PREFIX):
            raise ValueError(f"unexpected adapter tensor {key!r} (no {ADAPTER_PREFIX!r} prefix)")
        key = key[len(ADAPTER_PREFIX) :]
        suffix = next((s for s in LORA_PARTS if key.endswith(s)), None)
        if key.endswith(BASE_LAYER):
            base_layers[key[: -len(BASE_LAYER)] + ".weight"] = tensor
        elif suffix is None:
            replacements[key] = tensor  # a modules_to_save copy, saved under the base tensor's name
        else:
            parts.setdefault(key[: -len(suffix)], {})[LORA_PARTS[suffix]] = tensor
    deltas = {f"{module}.weight": _delta(module, p, config) for module, p in sorted(parts.items())}
    return Adapter(deltas, replacements, base_layers)


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


def merge_weights(base_dir: Path, adapter: Adapter, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """Write the merged safetensors shards (+ index) into `out_dir`; returns counts."""
    refs = read_index(base_dir)
    unknown = sorted((set(adapter.deltas) | set(adapter.replacements) | set(adapter.base_layers)) - set(refs))
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
                raw = read_tensor(refs[name], handles[refs[name].file])
            if name in adapter.deltas:
                return adapter.deltas[name].apply(raw).to(dtype)
            return raw.to(out_dtype(name))

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
            "replaced_tensors": len(adapter.replacements)}  # fmt: skip


def copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Tokenizer, chat template, generation config (and any custom code) beside the weights."""
    for p in sorted(Path(base_dir).iterdir()):
        if p.is_file() and not NOT_COPIED.fullmatch(p.name):
            shutil.copyfile(p, Path(out_dir) / p.name)
    adapter_tok = [p for p in sorted(Path(adapter_dir).iterdir()) if TOKENIZER_FILES.fullmatch(p.name)]
    if any(p.name == "tokenizer_config.json" for p in adapter_tok):
        for p in Path(out_dir).iterdir():  # a full tokenizer replaces the base's, not mixes with it
            if TOKENIZER_FILES.fullmatch(p.name):
                p.unlink()
        for p in adapter_tok:
            shutil.copyfile(p, Path(out_dir) / p.name)
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(Path(out_dir) / "config.json", config)


def merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """The complete merged model folder in the existing empty `out_dir` (not yet verified)."""
    adapter = read_adapter(adapter_dir)
    counts = merge_weights(base_dir, adapter, out_dir, dtype, max_shard_bytes)
    copy_side_files(base_dir, adapter_dir, out_dir, dtype)
    return counts


# ----------------------------------------------------------------------------- verification


def verify_inputs(packed_dir: Path, n: int, vocab_size: int) -> list[list[int]]:
    """Token ids of the first `n` validation sequences (at most VERIFY_MAX_TOKENS each), or one fixed
    sequence without a val split."""
    from reprotune.evaluate import read_val_sequences

    seqs = [s.input_ids[:VERIFY_MAX_TOKENS] for s in read_val_sequences(packed_dir, n)]
    if seqs:
        return seqs
    # Fixed, spread over the vocabulary (7919 is prime, so ids cycle through all residues).
    return [[(i * 7919) % vocab_size for i in range(FALLBACK_SEQUENCE_LEN)]]


@torch.no_grad()
def logits_of(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits (len, vocab) of each sequence, scored alone, on the CPU."""
    return [
        model(input_ids=torch.tensor([s], device=model.device), use_cache=False).logits[0].float().cpu() for s in seqs
    ]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def reference_logits(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype, seqs: list[list[int]], trust_remote_code: bool
) -> tuple[list[torch.Tensor], float]:
    """Logits of the unmerged PeftModel(base, adapter), what the merge must reproduce, and the noise
    floor: max |delta| of peft's own in-place merge_and_unload against them, in this dtype."""
    from peft import PeftModel

    from reprotune.evaluate import load_model

    model = PeftModel.from_pretrained(load_model(base_dir, dtype, trust_remote_code), adapter_dir).eval()
    unmerged = logits_of(model, seqs)
    return unmerged, max_abs_diff(logits_of(model.merge_and_unload(), seqs), unmerged)


def verify(
    merged_dir: Path,
    reference: list[torch.Tensor],
    noise_floor: float,
    dtype: torch.dtype,
    seqs: list[list[int]],
    trust_remote_code: bool,
) -> dict:
    """Compare the merged checkpoint's logits with `reference`; raise when they differ."""
    from reprotune.evaluate import load_model

    max_abs = max_abs_diff(logits_of(load_model(merged_dir, dtype, trust_remote_code), seqs), reference)
    scale = max(float(r.abs().max()) for r in reference)
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


def merge_and_verify(
    base_dir: Path,
    adapter_dir: Path,
    packed_dir: Path,
    out_dir: Path,
    dtype_name: str,
    verify_sequences: int,
    max_shard_size: str,
    trust_remote_code: bool = False,
) -> dict:
    """Merge into the empty `out_dir` and verify it; returns the metrics of metrics/merge.json."""
    start = time.perf_counter()
    dtype = resolve_dtype(dtype_name, base_dir)
    vocab = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    seqs = verify_inputs(packed_dir, verify_sequences, vocab)
    reference, noise_floor = reference_logits(base_dir, adapter_dir, dtype, seqs, trust_remote_code)
    counts = merge(base_dir, adapter_dir, out_dir, dtype, parse_size(max_shard_size))
    check = verify(out_dir, reference, noise_floor, dtype, seqs, trust_remote_code)
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
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 3),
    }

"""A GGUF file as the base model: llama.cpp's format turned into the safetensors folder every stage reads.

Many people hold a model only as the GGUF they run in llama.cpp or Ollama; `base.model:
models/local/NAME.gguf` fine-tunes it.

Features
- Reading: transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which dequantizes
  every tensor with the gguf package's kernels and undoes llama.cpp's rotary Q/K row permutation; the
  tokenizer is rebuilt from the file's vocabulary, merges, special tokens and chat template.
- Checked before anything is written (GGUFUnsupported: exit 2, nothing written):
  - the architecture is one whose conversion is tested here (SUPPORTED_ARCHITECTURES: llama, which
    covers Llama 1-3, SmolLM and the many GGUFs written with the llama layout);
  - the tokenizer is byte-level BPE (`tokenizer.ggml.model` gpt2) and the rebuilt tokenizer splits
    llama.cpp's probe text as the file's `tokenizer.ggml.pre` says (reprotune.llama_cpp names the
    rebuilt tokenizer by behaviour; the two names must agree). transformers rebuilds every BPE
    vocabulary with one generic byte-level split, which is exact only where the file's
    pre-tokenizer splits the same way; SentencePiece vocabularies (`llama`) are refused, since no
    fixture here can check their conversion.
- Written: model.safetensors in base.gguf_dtype (fp32: the dequantized values exactly; bf16/fp16 round
  them), without the output head when the file ties it to the embeddings (config tie_word_embeddings,
  as save_pretrained writes tied models); config.json without the GGUF quantization entry;
  tokenizer.json, tokenizer_config.json (model_max_length = the file's context length) and
  chat_template.jinja; generation_config.json whose eos_token_id lists every stop token of the file
  (EOS, end of turn, end of message).
- Provenance (reprotune_base.json): the file's SHA-256 and size, its file type and per-tensor
  quantization types, and a warning that the weights carry that quantization's error. The files
  written are byte-identical on every run.

Trade-offs
- The model is dequantized whole in memory (fp32: 4 bytes per parameter, 0.54 GB for SmolLM2-135M,
  28 GB for a 7B model); a 7B GGUF wants gguf_dtype bf16 and a large machine.
- The fine-tune starts from the quantized weights: the tuned model inherits the GGUF's quantization
  error (Q4_1 on SmolLM2-135M), and cannot be better than its source file in that respect.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from reprotune.errors import BadInput
from reprotune.files import check_size
from reprotune.io import sha256_file, sha256_tree, write_json
from reprotune.llama_cpp import GGUFUnsupported, pre_tokenizer_name, probe_hash
from reprotune.model.chat_templates import save_tokenizer
from reprotune.tensors import WEIGHTS_NAME, natural_key, write_safetensors

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"
GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata entry count (GGUF v2, v3)
SUPPORTED_TOKENIZERS = ("gpt2",)  # llama.cpp's name for byte-level BPE
GGUF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The loader's record of where it read from: paths and this machine's hub settings, not the model.
DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path")


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's key/values (without the vocabulary arrays) and its tensor types, {type: count}; a file
    that is no GGUF, or is cut short, is BadInput naming it (never the reader's numpy traceback)."""
    reader = _header(path)
    skipped = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in skipped}
    meta["tensor_types"] = dict(sorted(reader.tensor_types.items()))
    return meta


def _header(path: Path):
    """The file's header (metadata and tensor descriptions, not the tensors' data) once it is known to be a
    whole GGUF file: its magic, then its size against the end of the last tensor the header declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER.size)
    if size == 0:
        raise BadInput(f"{path}: is empty (0 bytes); expected a GGUF file")
    if not head.startswith(GGUF_MAGIC):
        raise BadInput(f"{path}: not a GGUF file: it starts with {head[:4]!r}, a GGUF file with {GGUF_MAGIC!r}")
    if len(head) < GGUF_HEADER.size:
        raise BadInput(f"{path}: cut short: {size} bytes, less than a GGUF header")
    _, version, tensors, entries = GGUF_HEADER.unpack(head)
    try:
        reader = _header_reader()(path)
    except Exception as e:  # the reader's numpy views fail in several ways on a short or damaged header
        raise BadInput(
            f"{path}: its header cannot be read ({type(e).__name__}: {e}); the file has {size:,} bytes for the "
            f"{entries} metadata entries and {tensors} tensor descriptions its header (GGUF v{version}) declares: "
            "cut short, or damaged"
        ) from None
    if hasattr(reader, "declared_end"):  # gguf called the hook (its private API; pinned in constraints.txt)
        check_size(path, size, reader.declared_end)
    return reader


def _header_reader():
    """gguf's GGUFReader that stops at the tensor descriptions: it records each tensor's type and where the
    last one ends, instead of mapping their data (which fails, opaquely, on a file cut short)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class HeaderReader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields) -> None:  # gguf's hook, called last in __init__
            self.tensors, self.tensor_types, self.declared_end = [], Counter(), start_offs
            for field in fields:
                _, _, _, dims, raw_dtype, offset = field.parts
                kind = GGMLQuantizationType(int(raw_dtype[0]))
                block, type_size = GGML_QUANT_SIZES[kind]
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
                self.tensor_types[kind.name] += 1
                self.declared_end = max(self.declared_end, end)

    return HeaderReader


def check_supported(model: str, meta: dict[str, Any]) -> None:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFUnsupported(
            f"base.model: {model!r} is a {arch!r} GGUF; converting it is tested for "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} only. Use the model's safetensors release instead"
        )
    tokenizer = meta.get("tokenizer.ggml.model")
    if tokenizer not in SUPPORTED_TOKENIZERS:
        raise GGUFUnsupported(
            f"base.model: {model!r} has a {tokenizer!r} tokenizer; only byte-level BPE (gpt2) vocabularies "
            "are rebuilt exactly here (SentencePiece is not checked). Use the model's safetensors release instead"
        )


def convert_gguf(model: str, path: Path, out_dir: Path, dtype_name: str) -> dict[str, Any]:
    """Write the safetensors model folder for GGUF file `path` into `out_dir`; return its provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta = read_metadata(path)
    check_supported(model, meta)
    log.info("reading %s (%s, tensors %s)", path.name, meta.get("general.name"), meta["tensor_types"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    check_tokenizer(model, tokenizer, meta)
    dtype = getattr(torch, GGUF_DTYPES[dtype_name])
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    write_weights(loaded, Path(out_dir) / WEIGHTS_NAME, dtype)
    write_config(loaded.config, out_dir, dtype)
    write_tokenizer(tokenizer, out_dir, meta)
    write_generation_config(meta, out_dir)
    quant = meta["tensor_types"]
    lossy = sorted(t for t in quant if t not in ("F32", "F16", "BF16"))
    return {
        "source": "gguf",
        "model": model,
        "revision": None,
        "commit_sha": None,
        "gguf": {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "name": meta.get("general.name"),
            "architecture": meta["general.architecture"],
            "file_type": meta.get("general.file_type"),
            "tensor_types": quant,
            "dtype": GGUF_DTYPES[dtype_name],
        },
        "warning": (
            f"weights dequantized from {', '.join(lossy)}: they carry that quantization's error, "
            "and so does the fine-tuned model"
            if lossy
            else None
        ),
        "files": sha256_tree(out_dir),
    }


def check_tokenizer(model: str, tokenizer, meta: dict[str, Any]) -> None:
    """The rebuilt tokenizer must split text as the file's pre-tokenizer name says."""
    expected = meta.get("tokenizer.ggml.pre", "default")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    found = pre_tokenizer_name(tokenizer, spec, key="base.model")
    if found != expected:
        raise GGUFUnsupported(
            f"base.model: {model!r} names its pre-tokenizer {expected!r}, but the tokenizer transformers "
            f"rebuilds from it splits text as {found!r} (probe hash {probe_hash(tokenizer)[:12]}...): the "
            "conversion would not tokenize as the file does. Use the model's safetensors release instead"
        )


def write_weights(model, path: Path, dtype) -> None:
    """All tensors in natural name order, the tied output head left out (it is the embedding)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{head}.weight", None)
    names = sorted(state, key=natural_key)
    specs = [(n, state[n].dtype, tuple(state[n].shape)) for n in names]
    write_safetensors(path, specs, (state[n].contiguous() for n in names))


def write_config(config, out_dir: Path, dtype) -> None:
    values = config.to_dict()
    for key in DROPPED_CONFIG_KEYS:
        values.pop(key, None)
    values.pop("torch_dtype", None)
    values["dtype"] = str(dtype).removeprefix("torch.")
    write_json(Path(out_dir) / "config.json", values)


def write_tokenizer(tokenizer, out_dir: Path, meta: dict[str, Any]) -> None:
    context = next((v for k, v in meta.items() if k.endswith(".context_length")), None)
    if context:
        tokenizer.model_max_length = int(context)
    save_tokenizer(tokenizer, out_dir)


def write_generation_config(meta: dict[str, Any], out_dir: Path) -> None:
    """BOS, PAD and every stop token of the file: llama.cpp stops at EOS, end of turn and end of message."""
    stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = sorted({int(s) for s in stops if s is not None})
    if not stops:
        raise BadInput("base.model: the GGUF file names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    values = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": stops}
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        values["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    write_json(Path(out_dir) / "generation_config.json", {k: v for k, v in values.items() if v is not None})

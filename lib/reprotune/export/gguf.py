"""GGUF for llama.cpp, written with the `gguf` package from a merged Llama checkpoint.

What is written (what llama.cpp's convert_hf_to_gguf.py writes for LlamaForCausalLM):
- tensors renamed: model.embed_tokens -> token_embd, model.norm -> output_norm, lm_head -> output
  (absent when the embeddings are tied: llama.cpp reuses token_embd), and per layer N
  blk.N.attn_q/attn_k/attn_v/attn_output, ffn_gate/ffn_up/ffn_down, attn_norm, ffn_norm.
- Q and K rows permuted for llama.cpp's rotary layout: HF rotates the two halves of each head
  (i, i + d/2), llama.cpp rotates adjacent pairs (2i, 2i + 1); K uses the KV head count (GQA).
- dtype (export.gguf_dtype), as llama.cpp's converter types tensors: f32 everything in float32;
  f16 every matrix in float16 (MOSTLY_F16); q8_0 every matrix in Q8_0 blocks (32 int8 values and a
  float16 scale, quantized by the gguf package bit-exactly as ggml does; a matrix whose rows do not
  split into 32s stays float16), the embedding and output head included (MOSTLY_Q8_0). 1-D tensors
  (norms) stay float32 in every dtype.
- hyperparameters: context length, embedding length, block count, feed-forward length, head
  counts, rope theta and dimension count, RMS norm epsilon, vocab size, file type, quantization
  version.
- tokenizer (byte-level BPE only, model "gpt2" in llama.cpp): tokens by id (holes up to the model's
  vocab size as UNUSED "[PAD<id>]"), token types (special added tokens CONTROL, other added tokens
  USER_DEFINED), merges, BOS/EOS/PAD ids, the generation config's other stop ids as EOT and EOM
  (llama.cpp stops at all three), whether BOS/EOS are added, the pre-tokenizer name chosen by
  behaviour (llama_cpp.py), and the chat template.

Tensors stream one at a time from the safetensors shards (header and tensor infos first, then
data), so memory stays near the largest tensor. Refused with a message: other
architectures, rope scaling, biases or other extra tensors, SentencePiece/WordPiece tokenizers;
the refusal (`GGUFUnsupported`) is bad input to the stage: exit code 2, nothing written.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import torch

from reprotune.llama_cpp import GGUFUnsupported, pre_tokenizer_name
from reprotune.loading import read_config
from reprotune.tensors import natural_key, read_index, read_tensor

log = logging.getLogger(__name__)

ARCH = "llama"
Q = gguf.GGMLQuantizationType
# export.gguf_dtype -> (tensor type of the matrices, file type); 1-D tensors (norms) always stay F32
GGUF_DTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
NUMPY_TYPES = {Q.F32: np.float32, Q.F16: np.float16}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}  # fmt: skip


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Llama tensor name; GGUFUnsupported for tensors llama.cpp has no slot for."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    raise GGUFUnsupported(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q/K weight (n_head * d, in) from HF's half-split to llama.cpp's interleaved pairs.

    Within each head, row i (first half) goes to 2i and row d/2 + i (second half) to 2i + 1.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_llama(config: dict) -> None:
    """GGUFUnsupported unless the checkpoint is a Llama the writer can convert exactly."""
    if config.get("model_type") != "llama":
        raise GGUFUnsupported(
            f"GGUF export supports Llama-architecture models only, not "
            f"{config.get('model_type')!r}; use llama.cpp's convert_hf_to_gguf.py"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GGUFUnsupported(f"GGUF export does not write rope scaling {rope!r}; use llama.cpp's converter")


def write_gguf(model_dir: Path, out_path: Path, dtype: str, name: str) -> dict:
    """Write `out_path` (GGUF, general.name `name`) from the HF Llama folder `model_dir`; returns a summary."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_llama(config)
    refs = read_index(model_dir)
    names = {n: gguf_name(n) for n in sorted(refs, key=natural_key)}  # fails before any file is opened
    matrix_type, file_type = GGUF_DTYPES[dtype]
    types = {hf: tensor_type(refs[hf].shape, matrix_type) for hf in names}
    writer = gguf.GGUFWriter(out_path, ARCH)
    _add_hparams(writer, config, name, file_type)
    n_vocab = _add_tokenizer(writer, model_dir, config["vocab_size"])
    writer.add_vocab_size(n_vocab)
    for hf, new in names.items():  # tensor infos first: the header holds every name, shape and offset
        _add_tensor_info(writer, new, refs[hf].shape, types[hf])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    with ExitStack() as stack:
        stack.callback(writer.close)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles = {f: stack.enter_context(open(f, "rb")) for f in sorted({r.file for r in refs.values()})}
        for hf in names:  # then the data, in the same order, one tensor in memory at a time
            w = read_tensor(refs[hf], handles[refs[hf].file]).float()
            if hf.endswith("q_proj.weight"):
                w = permute_rotary(w, heads)
            elif hf.endswith("k_proj.weight"):
                w = permute_rotary(w, kv_heads)
            writer.write_tensor_data(gguf.quants.quantize(w.numpy(), types[hf]))
    return {"tensors": len(names), "dtype": dtype, "vocab": n_vocab}


def tensor_type(shape: tuple[int, ...], matrix_type: Q) -> Q:
    """As llama.cpp's converter: 1-D tensors (norms) F32; a matrix whose rows do not split into Q8_0's
    32-value blocks F16; every other matrix, the embedding and output head included, `matrix_type`."""
    if len(shape) == 1:
        return Q.F32
    if matrix_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return matrix_type


def _add_tensor_info(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], kind: Q) -> None:
    if kind in NUMPY_TYPES:
        item = np.dtype(NUMPY_TYPES[kind])
        writer.add_tensor_info(name, shape, item, math.prod(shape) * item.itemsize)
    else:  # quantized: the writer takes the byte shape of the packed blocks
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)


def _add_hparams(writer: gguf.GGUFWriter, config: dict, name: str, file_type: int) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> int:
    """Byte-level BPE vocabulary, merges, special ids and chat template; returns the token count."""
    from transformers import AutoTokenizer

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise GGUFUnsupported(f"GGUF export supports BPE tokenizers only, not {spec['model']['type']}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(by_id) + 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec))
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(n)])
    writer.add_token_types([int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # llama.cpp stops at EOS, EOT and EOM: room for the generation config's first two other stop ids
    extra = _extra_stop_ids(model_dir, tokenizer.eos_token_id)
    for add, token_id in zip((writer.add_eot_token_id, writer.add_eom_token_id), extra):
        add(token_id)
    if len(extra) > 2:
        log.warning("GGUF holds 3 stop ids (EOS, EOT, EOM); stop ids %s are in the Modelfile only", extra[2:])
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds on its own, as llama.cpp must
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return n


def _extra_stop_ids(model_dir: Path, eos: int | None) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None and i != eos]

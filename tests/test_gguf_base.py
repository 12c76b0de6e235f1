"""A GGUF file as the base model: round trip through GGUF from the built-in model, no download.

The tests write their GGUF files from the built-in tiny model with the export stage's writer, then
convert them back with the base stage: weights, tokenizer, chat template and stop tokens must come
back equal (f32), the tie of a tied model must survive, reruns must be byte-identical, and what
cannot be converted exactly is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from reprotune.errors import BadInput
from reprotune.export.gguf import write_gguf
from reprotune.io import sha256_file, sha256_tree
from reprotune.llama_cpp import GGUFUnsupported
from reprotune.model.base import BaseInputs, resolve_base
from reprotune.model.gguf_base import check_supported, check_tokenizer

from helpers import params_with

TEXTS = [
    "Compute the sum.\n33 + 65",
    "  leading spaces, tabs\tand 12345 digits; émigré naïve 😀",
    "<|im_start|>user\nhello<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Write the words in reverse order.\nleaf wind door"},
    {"role": "assistant", "content": "door wind leaf"},
]


def repo_with(tmp_path: Path, gguf_file: Path) -> Path:
    root = tmp_path / "repo"
    (root / "models/local").mkdir(parents=True)
    shutil.copy(gguf_file, root / "models/local" / gguf_file.name)
    return root


def convert(root: Path, name: str, out: Path, **base) -> dict:
    params = params_with(base={"model": f"models/local/{name}", **base})
    return resolve_base(params, BaseInputs(repo_root=root), out)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_model_dir, path, "f32", "tiny")
    return path


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> tuple[Path, dict, Path]:
    tmp = tmp_path_factory.mktemp("converted")
    root = repo_with(tmp, tiny_gguf)
    prov = convert(root, tiny_gguf.name, tmp / "base")
    return tmp / "base", prov, root


def test_f32_round_trip_gives_back_the_weights(tiny_model_dir, converted):
    out, _, _ = converted
    original, back = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor.float()), name  # Q/K permutation undone, nothing rounded


def test_round_trip_tokenizes_and_templates_as_the_original(tiny_model_dir, converted):
    out, _, _ = converted
    original, back = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert back.encode(text) == original.encode(text), text
    assert back.apply_chat_template(CHAT, tokenize=False) == original.apply_chat_template(CHAT, tokenize=False)
    assert (back.eos_token, back.bos_token) == (original.eos_token, original.bos_token)


def test_generation_config_lists_every_stop_token(tiny_model_dir, converted):
    out, _, _ = converted
    original = json.loads((tiny_model_dir / "generation_config.json").read_text())["eos_token_id"]
    back = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(back) == sorted(original if isinstance(original, list) else [original])


def test_model_loads_and_scores_like_the_original(tiny_model_dir, converted):
    from transformers import AutoModelForCausalLM

    out, _, _ = converted
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_model_dir).encode(TEXTS[0])])
    logits = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits for d in (tiny_model_dir, out)
    ]
    assert torch.equal(*logits)


def test_provenance_records_the_file_and_its_quantization(tiny_gguf, converted):
    out, prov, _ = converted
    assert prov["source"] == "gguf" and prov["model"] == f"models/local/{tiny_gguf.name}"
    assert prov["gguf"]["sha256"] == sha256_file(tiny_gguf)
    assert prov["gguf"]["tensor_types"] == {"F32": len(load_file(out / "model.safetensors"))}
    assert prov["warning"] is None  # f32: nothing was lost
    assert json.loads((out / "reprotune_base.json").read_text()) == prov
    assert str(out) not in json.dumps(prov)


def test_rerun_is_byte_identical(tiny_gguf, converted, tmp_path):
    out, _, root = converted
    convert(root, tiny_gguf.name, tmp_path / "again")
    assert sha256_tree(tmp_path / "again") == sha256_tree(out)


def test_quantized_file_warns_that_its_error_is_inherited(tiny_model_dir, tmp_path):
    path = tmp_path / "q8.gguf"
    write_gguf(tiny_model_dir, path, "q8_0", "tiny")
    prov = convert(repo_with(tmp_path, path), path.name, tmp_path / "base")
    assert "Q8_0" in prov["gguf"]["tensor_types"]
    assert "Q8_0" in prov["warning"]
    original, back = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "base/model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    err = (back[w] - original[w].float()).abs().max()
    assert 0 < err <= 0.01 * original[w].abs().max()  # 8-bit blocks: dequantized, close, not equal


def test_tied_embeddings_stay_tied(tiny_model_dir, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "tied.gguf"
    write_gguf(tied, path, "f32", "tied")
    convert(repo_with(tmp_path, path), path.name, tmp_path / "base")
    assert json.loads((tmp_path / "base/config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(tmp_path / "base/model.safetensors")


def test_bf16_when_asked(tiny_gguf, tmp_path):
    convert(repo_with(tmp_path, tiny_gguf), tiny_gguf.name, tmp_path / "base", gguf_dtype="bf16")
    assert json.loads((tmp_path / "base/config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "base/model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "meta, refused",
    [
        ({"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2"}, "'qwen2' GGUF"),
        ({"general.architecture": "llama", "tokenizer.ggml.model": "llama"}, "'llama' tokenizer"),
    ],
)
def test_unsupported_architecture_or_tokenizer_is_refused(meta, refused):
    with pytest.raises(GGUFUnsupported, match=refused) as info:
        check_supported("models/local/x.gguf", meta)
    assert str(info.value).startswith("base.model:")


def test_a_tokenizer_that_splits_unlike_its_named_pre_tokenizer_is_refused(converted):
    out, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    with pytest.raises(GGUFUnsupported, match="names its pre-tokenizer 'llama-bpe'"):
        check_tokenizer("models/local/x.gguf", tokenizer, {"tokenizer.ggml.pre": "llama-bpe"})


def test_missing_file_is_bad_input(tmp_path):
    (tmp_path / "models/local").mkdir(parents=True)
    with pytest.raises(BadInput, match="GGUF file 'models/local/none.gguf' not found"):
        convert(tmp_path, "none.gguf", tmp_path / "base")

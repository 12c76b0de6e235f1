"""GGUF details llama.cpp depends on: the pre-tokenizer name, Q8_0 tensors, stop tokens, the Modelfile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from reprotune import llama_cpp
from reprotune.export.gguf import write_gguf
from reprotune.export.modelfile import default_system_message, is_chatml, render_modelfile
from reprotune.llama_cpp import GGUFUnsupported, pre_tokenizer_name

FIXTURE = Path(__file__).parent / "fixtures/llama_cpp/pre_tokenizer_names.json"
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def merged(tiny_model_dir) -> Path:
    return tiny_model_dir


def with_tokenizer(src: Path, dst: Path, pre_tokenizer: dict, ignore_merges: bool = False):
    """The tiny model's tokenizer with another pre-tokenizer (same vocabulary and merges)."""
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    spec = json.loads((dst / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre_tokenizer, ignore_merges
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(dst), spec


def split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}  # fmt: skip


def test_every_name_the_writer_can_emit_is_one_llama_cpp_accepts():
    accepted = set(json.loads(FIXTURE.read_text())["names"])
    assert llama_cpp.names() <= accepted, llama_cpp.names() - accepted
    assert "gpt2" not in accepted  # the old writer's name: llama.cpp fails the load on it


def test_probe_text_is_llama_cpps():
    # sha256 of the probe's UTF-8 bytes as quoted from llama.cpp's converter (it holds a ZWJ and a U+FE0F)
    probe = llama_cpp.converter_table()["probe_text"]
    assert __import__("hashlib").sha256(probe.encode()).hexdigest().startswith("a36179c1e2b1cfcf")


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False, "gpt-2"),
    (split_then_bytes(llama_cpp.LLAMA3_REGEX), True, "llama-bpe"),
    (split_then_bytes(llama_cpp.QWEN2_REGEX), False, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
      {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, False, "smollm"),
])  # fmt: skip
def test_name_follows_the_split_not_the_json(merged, tmp_path, pre_tokenizer, ignore_merges, name):
    tokenizer, spec = with_tokenizer(merged, tmp_path / "tok", pre_tokenizer, ignore_merges)
    assert pre_tokenizer_name(tokenizer, spec) == name


@pytest.mark.parametrize(
    "pre_tokenizer, ignore_merges, found",
    [
        ({"type": "Whitespace"}, False, "Whitespace"),
        (split_then_bytes(llama_cpp.LLAMA3_REGEX), False, "Split"),  # Llama 3's split, but merges not ignored
    ],
)
def test_a_split_llama_cpp_has_no_name_for_is_refused(merged, tmp_path, pre_tokenizer, ignore_merges, found):
    tokenizer, spec = with_tokenizer(merged, tmp_path / "tok", pre_tokenizer, ignore_merges)
    with pytest.raises(GGUFUnsupported, match=f"export.formats gguf: no llama.cpp pre-tokenizer name.*{found}"):
        pre_tokenizer_name(tokenizer, spec)


def test_the_converters_table_comes_first(merged, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(merged)
    spec = json.loads((merged / "tokenizer.json").read_text())
    table = {**llama_cpp.converter_table(), "known_hashes": {llama_cpp.probe_hash(tokenizer): "smollm"}}
    monkeypatch.setattr(llama_cpp, "converter_table", lambda: table)
    assert pre_tokenizer_name(tokenizer, spec) == "smollm"


def test_q8_0_quantizes_matrices_keeps_norms_and_stays_close(merged, tmp_path):
    write_gguf(merged, tmp_path / "m.gguf", "q8_0", "tiny")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    tensors = {t.name: t for t in reader.tensors}
    assert {t.tensor_type for n, t in tensors.items() if n.endswith("norm.weight")} == {Q.F32}
    assert {t.tensor_type for n, t in tensors.items() if not n.endswith("norm.weight")} == {Q.Q8_0}
    with safe_open(merged / "model.safetensors", "pt") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight").numpy()
    got = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, Q.Q8_0).reshape(up.shape)
    # each block of 32 is scaled to max|x| / 127: the error is half a step, plus the fp16 rounding of the
    # scale (relative 2^-11) times the largest value, 127 steps
    step = np.abs(up).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - up).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11)).all()
    assert (tmp_path / "m.gguf").stat().st_size < 0.3 * sum(t.n_elements for t in tensors.values()) * 4


def test_every_stop_token_of_the_generation_config_is_in_the_gguf(merged, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(merged, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [1, 4, 3]}))
    write_gguf(model, tmp_path / "m.gguf", "f16", "tiny")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    stops = [fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("eos", "eot", "eom")]
    assert stops == [1, 4, 3]


def test_modelfile_serves_the_chat_template_stops_and_default_system(merged, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = render_modelfile("model.q8_0.gguf", tokenizer, {1, 4})
    assert text.startswith('FROM ./model.q8_0.gguf\nTEMPLATE """') and "SYSTEM" not in text
    stops = [line for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "</s>"', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    # a ChatML template that injects a system message when there is none (SmolLM2's does)
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are SmolLM.<|im_end|>\n"
                               "{% endif %}" + tokenizer.chat_template)  # fmt: skip
    assert is_chatml(tokenizer) and default_system_message(tokenizer) == "You are SmolLM."
    assert 'SYSTEM """You are SmolLM."""' in render_modelfile("m.gguf", tokenizer, {1})
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert not is_chatml(tokenizer) and "TEMPLATE" not in render_modelfile("m.gguf", tokenizer, {1}).split("#")[0]

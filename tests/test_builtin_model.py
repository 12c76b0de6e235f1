"""The built-in tiny model (reproducible, loadable, trainable) and base-model resolution."""

from __future__ import annotations

import json
import math
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import pytest
import torch

from reprotune.errors import BadInput
from reprotune.io import sha256_tree
from reprotune.model.base import PROVENANCE_FILE, BaseInputs, resolve_base
from reprotune.model.builtin import build_tiny_llama

from helpers import params_with

EXPECTED_FILES = {
    "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip
SAMPLE = "### Instruction:\nAdd 12 and 30.\n\n### Response:\n42"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def test_rebuild_is_byte_identical(tiny, tmp_path):
    build_tiny_llama(tmp_path)
    assert set(sha256_tree(tiny)) == EXPECTED_FILES  # safetensors only, no pickles, no stray files
    assert sha256_tree(tmp_path) == sha256_tree(tiny)


def test_no_build_path_in_json(tiny):
    for p in tiny.glob("*.json"):
        text = p.read_text(encoding="utf-8")
        assert str(tiny) not in text and "/tmp" not in text, p.name


def test_model_shape_and_forward(model, tokenizer):
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 10_000_000
    assert model.config.vocab_size == len(tokenizer) == 4096
    assert not model.config.tie_word_embeddings
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):  # bitsandbytes 4-bit needs multiples of 64
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0
    batch = tokenizer(SAMPLE, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())


def test_tokenizer_round_trip_and_no_bos(tokenizer):
    ids = tokenizer(SAMPLE)["input_ids"]
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert len(ids) < len(SAMPLE) / 2  # trained on this format: it tokenizes compactly
    assert tokenizer.model_max_length == 2048
    assert tokenizer.pad_token == "<pad>" and tokenizer.unk_token is None


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer(text)["input_ids"]  # a special token, not split into pieces


def test_generation_config_stops_on_im_end(tiny, tokenizer):
    gen = json.loads((tiny / "generation_config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"])
    assert gen["eos_token_id"] == ids and gen["pad_token_id"] == tokenizer.pad_token_id


def test_resolve_builtin(tiny, tmp_path):
    prov = resolve_base(
        params_with(base={"model": "builtin:tiny-llama", "revision": None}), BaseInputs(), tmp_path / "base"
    )
    assert prov == {"source": "builtin", "model": "builtin:tiny-llama", "revision": None,
                    "commit_sha": None, "trust_remote_code": False}  # fmt: skip
    assert json.loads((tmp_path / "base" / PROVENANCE_FILE).read_text()) == prov
    built = sha256_tree(tmp_path / "base")
    built.pop(PROVENANCE_FILE)
    assert built == sha256_tree(tiny)


def test_resolve_unknown_builtin(tmp_path):
    with pytest.raises(BadInput, match="builtin:tiny-llama"):
        resolve_base(
            params_with(base={"model": "builtin:huge-llama", "revision": None}), BaseInputs(), tmp_path / "base"
        )


def test_resolve_local_copies_only_needed_files(tiny, tmp_path):
    src = tmp_path / "repo" / "models" / "local" / "mine"
    shutil.copytree(tiny, src)
    for junk in ("training_args.bin", "optimizer.pt", "README.md"):
        (src / junk).write_bytes(b"junk")
    out = tmp_path / "base"
    prov = resolve_base(
        params_with(base={"model": "models/local/mine", "revision": None, "trust_remote_code": True}),
        BaseInputs(tmp_path / "repo"),
        out,
    )
    assert prov["source"] == "local" and prov["model"] == "models/local/mine"  # as given, not absolute
    assert prov["trust_remote_code"] is True
    assert prov["files"] == sha256_tree(tiny)
    assert set(sha256_tree(out)) == EXPECTED_FILES | {PROVENANCE_FILE}


def test_resolve_local_rejects_pickle_only(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BadInput, match="safetensors only"):
        resolve_base(params_with(base={"model": str(src), "revision": None}), BaseInputs(), tmp_path / "base")


@pytest.mark.parametrize(
    "files, message",
    [
        ({"model.safetensors": b"x"}, "has no config.json"),
        ({"config.json": b"{}"}, "has no \\*.safetensors weights"),
    ],
)
def test_resolve_local_refuses_an_incomplete_folder_naming_the_key(tmp_path, files, message):
    src = tmp_path / "incomplete"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
    with pytest.raises(BadInput, match=f"base.model: '{src}' {message}"):  # exit 2
        resolve_base(params_with(base={"model": str(src), "revision": None}), BaseInputs(), tmp_path / "base")


def test_resolve_refuses_non_empty_output(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale").write_text("x")
    with pytest.raises(RuntimeError, match="not empty"):
        resolve_base(
            params_with(base={"model": "builtin:tiny-llama", "revision": None}), BaseInputs(), tmp_path / "base"
        )


def test_resolve_hub_pins_commit_and_skips_pickles(tiny, tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"

    def fake_download(repo_id, *, revision, local_dir, allow_patterns, ignore_patterns):
        shutil.copytree(tiny, local_dir, dirs_exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)  # what the real one leaves
        return str(local_dir)

    with mock.patch("huggingface_hub.HfApi") as api, \
         mock.patch("huggingface_hub.snapshot_download", side_effect=fake_download) as dl:  # fmt: skip
        api.return_value.model_info.return_value.sha = sha
        prov = resolve_base(
            params_with(base={"model": "org/name", "revision": "main"}), BaseInputs(), tmp_path / "base"
        )
    api.return_value.model_info.assert_called_once_with("org/name", revision="main")
    kwargs = dl.call_args.kwargs
    assert dl.call_args.args == ("org/name",) and kwargs["revision"] == sha
    for pickle in ("pytorch_model.bin", "model.pt", "original/consolidated.00.pth"):
        assert not any(fnmatch(pickle, p) for p in kwargs["allow_patterns"]), pickle
    assert "*.bin" in kwargs["ignore_patterns"]
    assert prov["source"] == "hub" and prov["revision"] == "main" and prov["commit_sha"] == sha
    assert not (tmp_path / "base" / ".cache").exists()
    assert prov["files"] == sha256_tree(tiny)


def test_resolve_hub_needs_revision(tmp_path):
    with mock.patch("huggingface_hub.HfApi") as api:
        with pytest.raises(BadInput, match="revision"):
            resolve_base(params_with(base={"model": "org/name", "revision": None}), BaseInputs(), tmp_path / "base")
    api.assert_not_called()


def test_config_knows_exactly_the_builtin_models():
    from reprotune.config.check import BUILTIN_MAX_POSITIONS, BUILTIN_PREFIX
    from reprotune.model.base import BUILTIN_MODELS

    assert sorted(BUILTIN_MAX_POSITIONS) == sorted(BUILTIN_PREFIX + name for name in BUILTIN_MODELS)

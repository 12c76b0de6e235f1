"""Export: folder contents, manifest check, reproducibility, GGUF round trip, a card with no secrets."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

import reprotune
from reprotune.config import load_params
from reprotune.errors import BadInput
from reprotune.export.bundle import ExportInputs, build_export
from reprotune.export.card import scrub
from reprotune.export.gguf import write_gguf
from reprotune.export.manifest import ManifestError, verify_manifest
from reprotune.io import sha256_file, sha256_tree

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "Ab3" * 10
PROVENANCE = {
    "source": "hub",
    "model": "org/tiny-llama",
    "revision": "main",
    "commit_sha": "0123456789abcdef0123456789abcdef01234567",
    "trust_remote_code": False,
}


@pytest.fixture(scope="module")
def merged(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[Path, Path]:
    """models/base/reprotune_base.json and a metrics folder, as the earlier stages leave them (results only:
    the stage doorway keeps seconds, memory and the merge check's rounding noise in metrics/runtime/)."""
    root = tmp_path_factory.mktemp("records")
    (root / "reprotune_base.json").write_text(json.dumps(PROVENANCE))
    metrics = root / "metrics"
    metrics.mkdir()
    retention = {"prompts": 240, "prefix_tokens": 8, "base": {"nll": 0.675, "begins_as_base_count": 240},
                 "as_shipped": {"nll": 0.775, "begins_as_base_count": 43}}  # fmt: skip
    (metrics / "evaluate.json").write_text(json.dumps(
        {"base": {"loss": 5.5, "exact_match": 0.0, "exact_match_count": 0, "generated": 4},
         "as_shipped": {"loss": 1.25, "exact_match": 0.5, "exact_match_count": 2, "generated": 4},
         "delta_loss": -4.25, "retention": retention}))  # fmt: skip
    (metrics / "merge.json").write_text(json.dumps({"rtol": 1e-4, "verify_sequences": 4}))
    return root / "reprotune_base.json", metrics


def export_params(formats=("safetensors", "gguf"), gguf_dtype="f16"):
    params = load_params(REPO / "params.yaml")
    export = dataclasses.replace(params.export, formats=formats, gguf_dtype=gguf_dtype)
    return dataclasses.replace(params, export=export)


@pytest.fixture(scope="module")
def exported(merged, records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    build_export(export_params(), ExportInputs(merged, records[0], tuple(sorted(records[1].iterdir())), REPO), out)
    return out


def test_folder_holds_model_tokenizer_card_gguf_and_manifest(merged, exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {p.name for p in merged.iterdir()} | {"README.md", "manifest.json", "model.f16.gguf", "Modelfile"}
    for p in merged.iterdir():
        assert sha256_file(exported / p.name) == sha256_file(p)  # copied byte for byte
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["files"] == {k: v for k, v in sha256_tree(exported).items() if k != "manifest.json"}
    assert verify_manifest(exported) == len(names) - 1


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text() + " "), "changed: config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "missing: tokenizer.json"),
    (lambda d: (d / "extra.txt").write_text("x"), "not in manifest: extra.txt"),
])  # fmt: skip
def test_manifest_fails_after_tampering(exported, tmp_path, tamper, message):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    verify_manifest(copy)
    tamper(copy)
    with pytest.raises(ManifestError, match=re.escape(message)):
        verify_manifest(copy)


def test_export_twice_gives_identical_bytes(merged, records, exported, tmp_path):
    build_export(export_params(), ExportInputs(merged, records[0], tuple(sorted(records[1].iterdir())), REPO), tmp_path)
    assert sha256_tree(tmp_path) == sha256_tree(exported)


def test_gguf_round_trip(merged, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    write_gguf(merged, path, "f32", "tiny-llama")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = json.loads((merged / "config.json").read_text())
    assert field("general.architecture") == "llama" and field("general.name") == "tiny-llama"
    assert field("general.file_type") == gguf.LlamaFileType.ALL_F32
    for key, value in {"context_length": 2048, "embedding_length": 256, "block_count": 4, "feed_forward_length": 704,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64,
                       "vocab_size": 4096}.items():  # fmt: skip
        assert field(f"llama.{key}") == value, key
    assert field("llama.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    tok = AutoTokenizer.from_pretrained(merged)
    spec = json.loads((merged / "tokenizer.json").read_text())
    # model "gpt2" is byte-level BPE; its pre-tokenizer is llama.cpp's "gpt-2" (a "gpt2" there fails the load)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(4096)))
    assert field("tokenizer.ggml.token_type")[:6] == [3, 3, 3, 3, 3, 1]  # 5 specials are CONTROL
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]
    assert (
        field("tokenizer.ggml.bos_token_id"),
        field("tokenizer.ggml.eos_token_id"),
        field("tokenizer.ggml.padding_token_id"),
        field("tokenizer.ggml.eot_token_id"),
    ) == (0, 1, 2, 4)
    assert field("tokenizer.chat_template") == tok.chat_template

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 4 * 9
    with safe_open(merged / "model.safetensors", "pt") as f:
        hf = {k: f.get_tensor(k).numpy() for k in f.keys()}
    assert np.array_equal(tensors["token_embd.weight"].data, hf["model.embed_tokens.weight"])
    assert np.array_equal(tensors["output.weight"].data, hf["lm_head.weight"])
    assert np.array_equal(tensors["output_norm.weight"].data, hf["model.norm.weight"])
    for ours, theirs in [("ffn_gate", "mlp.gate_proj"), ("ffn_down", "mlp.down_proj"), ("attn_v", "self_attn.v_proj"),
                         ("attn_output", "self_attn.o_proj"), ("attn_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")]:  # fmt: skip
        assert np.array_equal(tensors[f"blk.3.{ours}.weight"].data, hf[f"model.layers.3.{theirs}.weight"]), ours
    # Rotary layout: HF rotates (i, i + d/2) within a head, llama.cpp adjacent pairs (2i, 2i + 1).
    for name, heads in (("q", 4), ("k", 2)):
        w, g = hf[f"model.layers.1.self_attn.{name}_proj.weight"], tensors[f"blk.1.attn_{name}.weight"].data
        assert g.shape == w.shape
        d = w.shape[0] // heads
        for h in range(heads):
            for i in range(d // 2):
                assert np.array_equal(g[h * d + 2 * i], w[h * d + i])
                assert np.array_equal(g[h * d + 2 * i + 1], w[h * d + d // 2 + i])


def test_gguf_f16_keeps_norms_in_f32(exported, merged):
    reader = gguf.GGUFReader(exported / "model.f16.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_up.weight"].data.dtype == np.float16
    assert tensors["blk.0.ffn_norm.weight"].data.dtype == np.float32
    with safe_open(merged / "model.safetensors", "pt") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert np.array_equal(tensors["blk.0.ffn_up.weight"].data, up.to(torch.float16).numpy())


def test_gguf_refuses_other_architectures(merged, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for p in merged.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BadInput, match="Llama-architecture"):
        build_export(export_params(), ExportInputs(other, tmp_path / "none.json", (), REPO), tmp_path / "out")


def test_card_records_provenance_data_params_and_metrics(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model: org/tiny-llama" in card
    assert PROVENANCE["commit_sha"] in card and f"reprotune {reprotune.__version__}" in card
    for path in ("data/sample/alpaca.jsonl", "data/sample/chat.jsonl"):
        assert f"| `{path}` |" in card and sha256_file(REPO / path) in card
    params = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert list(params) == ["base", "data", "tokenize", "quant", "lora", "train", "merge", "evaluate", "export"]
    assert params["lora"]["r"] == 16 and params["export"]["formats"] == ["safetensors", "gguf"]
    assert "| evaluate.as_shipped.loss | 1.25 |" in card and "| evaluate.delta_loss | -4.25 |" in card
    assert "| exact match (of 4 validation answers) | 0 | 2 |" in card  # the headline, base beside this model
    assert "| retention: NLL of the base's own answers to 240 general prompts | 0.675 | 0.775 |" in card
    assert "| retention: answers beginning as the base's (first 8 tokens) | 240 | 43 |" in card
    assert "| merge.rtol | 0.0001 |" in card and "| merge.verify_sequences | 4 |" in card
    assert "`model.f16.gguf`" in card and "`manifest.json`" in card


def test_card_holds_no_secrets_or_absolute_paths(merged, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-from-env")
    monkeypatch.setenv("WANDB_API_KEY", "another-secret-0123")
    home_file = tmp_path / "private" / "train.jsonl"
    home_file.parent.mkdir()
    home_file.write_text("{}\n")
    params = export_params(formats=("safetensors",))
    datasets = (
        dataclasses.replace(params.data.datasets[0], path=str(home_file)),
        dataclasses.replace(params.data.datasets[1], path="C:\\Users\\alice\\chat.jsonl"),
    )
    params = dataclasses.replace(
        params,
        data=dataclasses.replace(params.data, datasets=datasets),
        base=dataclasses.replace(params.base, revision=TOKEN),
    )
    provenance = tmp_path / "prov.json"
    provenance.write_text(
        json.dumps(
            {
                **PROVENANCE,
                "revision": TOKEN,
                "commit_sha": "s3cr3t-value-from-env",
                "model": "/home/alice/models/llama",
            }
        )
    )
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "train.json").write_text(json.dumps({"note": "another-secret-0123", "output_dir": str(tmp_path)}))
    out = tmp_path / "out"
    out.mkdir()
    build_export(params, ExportInputs(merged, provenance, (metrics / "train.json",), REPO), out)
    card = (out / "README.md").read_text()
    for leak in (
        TOKEN,
        "s3cr3t-value-from-env",
        "another-secret-0123",
        str(tmp_path),
        "/home/alice",
        "C:\\Users",
        str(REPO),
        os.path.expanduser("~"),
    ):
        assert leak not in card, leak
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", card)
    assert not re.search(r"(?<![\w.:/~-])/[\w.-]+/", card)  # no absolute POSIX path at all
    assert "`<local>/train.jsonl`" in card  # the file name alone stays, to say which file it was


def test_scrub_keeps_urls_and_relative_paths():
    text = "see https://huggingface.co/org/name and data/sample/alpaca.jsonl, 3/4 and /etc/passwd"
    assert scrub(text, env={}) == text.replace("/etc/passwd", "<local>/passwd")
    assert scrub(f"token {TOKEN}!", env={}) == "token <redacted>!"
    env = {"MY_SECRET": "value-of-a-secret", "PATH": "here"}  # only secret-named variables count
    assert scrub("a value-of-a-secret here", env=env) == "a <redacted> here"


def test_stage_builds_the_folder(merged, records, tmp_path, monkeypatch):
    provenance, metrics = records
    for src, dst in (
        (merged, "models/merged"),
        (provenance, "models/base/reprotune_base.json"),
        (metrics, "metrics"),
        (REPO / "data/sample", "data/sample"),
        (REPO / "data/prompts", "data/prompts"),
        (REPO / "params.yaml", "params.yaml"),
        (REPO / "dvc.yaml", "dvc.yaml"),
    ):
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dst).symlink_to(src)
    monkeypatch.chdir(tmp_path)
    # the stage script as dvc runs it: the card reads every section, all declared in dvc.yaml
    runpy.run_path(str(REPO / "stages/export.py"), run_name="__main__")
    assert verify_manifest(tmp_path / "models/export") > 5
    assert not (tmp_path / "models/export/model.f16.gguf").exists()  # params.yaml: safetensors only
    assert sha256_file(REPO / "data/sample/alpaca.jsonl") in (tmp_path / "models/export/README.md").read_text()


def test_card_of_a_gguf_base_records_the_file_hash_quantization_and_warning():
    from reprotune.export.card import render_card

    provenance = {"source": "gguf", "model": "models/local/m.gguf", "revision": None, "commit_sha": None,
                  "gguf": {"sha256": "ab" * 32, "tensor_types": {"F32": 61, "Q4_1": 210}},
                  "warning": "weights dequantized from Q4_1: they carry that quantization's error"}  # fmt: skip
    card = render_card(load_params(REPO / "params.yaml"), provenance, [], ["model.safetensors"], {}, "0")
    assert f"| GGUF sha256 | `{'ab' * 32}` |" in card
    assert "| GGUF tensor types | F32 x61, Q4_1 x210 |" in card
    assert "| warning | weights dequantized from Q4_1" in card

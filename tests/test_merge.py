"""The merge: merged weights equal base + adapter, the files are reproducible, failures write nothing."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tied_copy
from safetensors import safe_open

from reprotune.errors import BadInput
from reprotune.io import sha256_tree
from reprotune.merge import MergeInputs, merge, merge_and_verify, plan_shards, read_adapter, resolve_dtype

from helpers import params_with

REPO = Path(__file__).resolve().parents[1]
TOKEN_IDS = [12, 305, 4095]  # two of them in the `packed` sequences


def merge_params(dtype: str, verify_sequences: int, max_shard_size: str):
    """The folding math is checked on the original weights here; test_fold_into covers `dequantized`."""
    return params_with(
        merge={"dtype": dtype, "verify_sequences": verify_sequences, "fold_into": "original"},
        export={"max_shard_size": max_shard_size},
    )


def make_adapter(base: Path, out: Path, seed: int = 1, **lora) -> None:
    """A peft LoRA adapter on every linear layer but lm_head, with lora_B made non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # peft inits one factor to 0 (B; A for an embedding), token rows to the base's: the merge
            # would be a no-op
            if "lora_B" in name or "lora_embedding_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))
    model.save_pretrained(out)


def write_packed(root: Path, rows: list[list[tuple[list[int], list[int]]]]) -> Path:
    """data/packed/val/part-00000.parquet from rows of (input_ids, labels) sequences packed back to back."""
    cols: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for row in rows:
        cols["input_ids"].append([t for ids, _ in row for t in ids])
        cols["labels"].append([t for _, labels in row for t in labels])
        cols["position_ids"].append([i for ids, _ in row for i in range(len(ids))])
        cols["seq_lens"].append([len(ids) for ids, _ in row])
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in cols.items()})
    (root / "val").mkdir(parents=True)
    pq.write_table(table, root / "val" / "part-00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"sequence_len": 64, "packed": True}))
    return root


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    make_adapter(base, out)
    return out


@pytest.fixture(scope="module")
def odd_adapters(base, tmp_path_factory) -> dict[str, Path]:
    """DoRA + rsLoRA + modules_to_save, LoRA on the embedding (saved with its base layer) + alpha_pattern, and
    trained token rows of the embedding and the head (as training sets them for added tokens)."""
    kinds = {
        "dora": {"use_dora": True, "use_rslora": True, "modules_to_save": ["lm_head"]},
        "emb": {"target_modules": ["q_proj", "embed_tokens"], "alpha_pattern": {"q_proj": 4}},
        "tokens": {"trainable_token_indices": {"model.embed_tokens": TOKEN_IDS, "lm_head": TOKEN_IDS}},
    }
    out = {name: tmp_path_factory.mktemp(name) for name in kinds}
    for name, lora in kinds.items():
        make_adapter(base, out[name], **lora)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    seq = lambda n, s: (list(range(s, s + n)), [-100] * (n // 2) + list(range(s + n // 2, s + n)))  # noqa: E731
    return write_packed(tmp_path_factory.mktemp("data") / "packed", [[seq(20, 10), seq(12, 300)], [seq(30, 900)]])


@pytest.fixture(scope="module")
def merged(base, adapter, packed, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged")
    return out, merge_and_verify(merge_params("auto", 3, "6MB"), MergeInputs(base, adapter, packed), out)


def test_merged_weights_equal_base_plus_delta(base, adapter, merged):
    """W' = W + (alpha / r) B @ A, computed here from the raw files, for every adapted tensor."""
    out, metrics = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    adapted = 0
    with safe_open(base / "model.safetensors", "pt") as b, safe_open(adapter / "adapter_model.safetensors", "pt") as a:
        for name in b.keys():
            with safe_open(out / index[name], "pt") as m:
                got = m.get_tensor(name)
            module = "base_model.model." + name.removesuffix(".weight")
            expected = b.get_tensor(name)
            if f"{module}.lora_A.weight" in a.keys():
                B, A = a.get_tensor(f"{module}.lora_B.weight"), a.get_tensor(f"{module}.lora_A.weight")
                expected = expected + 2.0 * B @ A  # alpha / r = 16 / 8
                adapted += 1
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert adapted == metrics["merged_tensors"] == 28  # 4 layers x 7 linear layers; lm_head untouched
    assert metrics["max_abs_diff"] <= metrics["tolerance"] == 1e-4 * max(1.0, metrics["logit_scale"])
    assert 0 <= metrics["noise_floor"] < 1e-5  # fp32: peft's own merge costs next to nothing
    assert metrics["verify_sequences"] == 3 and metrics["dtype"] == "float32"


def test_merged_model_matches_peft_merge_and_unload(base, adapter, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(merged[0])
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
    base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (ours(ids).logits - base_logits).abs().max() > 1e-2  # the adapter did change something


def test_layout_is_sharded_like_save_pretrained(base, merged):
    out, metrics = merged
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert metrics["shards"] == len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors.index.json",
    } <= set(names)
    assert "reprotune_base.json" not in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sizes = [(out / s).stat().st_size for s in shards]
    assert max(sizes) < 6_000_000 + 100_000  # the limit, plus the header
    assert index["metadata"]["total_size"] == sum(sizes) - sum(_header_bytes(out / s) for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_merging_twice_gives_identical_bytes(base, adapter, merged, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    merge(base, adapter, again, torch.float32, 6_000_000)
    assert sha256_tree(again) == sha256_tree(merged[0])


def test_single_file_when_under_the_shard_limit(base, adapter, tmp_path):
    merge(base, adapter, tmp_path, torch.float32, 2 * 10**9)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]


def test_bf16_merge_within_documented_tolerance(base, adapter, packed, tmp_path):
    metrics = merge_and_verify(merge_params("bf16", 2, "2GB"), MergeInputs(base, adapter, packed), tmp_path)
    assert metrics["dtype"] == "bfloat16" and metrics["rtol"] == 2e-2
    assert metrics["max_abs_diff"] <= metrics["tolerance"]
    assert metrics["tolerance"] == max(2e-2 * max(1.0, metrics["logit_scale"]), 2 * metrics["noise_floor"])
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_dora_rslora_modules_to_save_and_embedding_lora(base, packed, odd_adapters, tmp_path):
    """Less common adapter kinds merge exactly too (checked against PeftModel logits)."""
    params = merge_params("fp32", 2, "2GB")
    (tmp_path / "m1").mkdir()
    m = merge_and_verify(params, MergeInputs(base, odd_adapters["dora"], packed), tmp_path / "m1")
    assert m["replaced_tensors"] == 1 and m["max_abs_diff"] <= 1e-4 * max(1.0, m["logit_scale"])
    (tmp_path / "m2").mkdir()
    m = merge_and_verify(params, MergeInputs(base, odd_adapters["emb"], packed), tmp_path / "m2")
    assert m["merged_tensors"] == 5 and m["max_abs_diff"] <= m["tolerance"]


@pytest.mark.parametrize("kind", ["plain", "dora", "emb", "tokens"])
def test_streamed_reference_is_peft_model_exactly(base, adapter, odd_adapters, kind):
    """The reference streamed from disk one module at a time gives PeftModel(base, adapter)'s logits bit for
    bit (fp32), and peft's merge applied module by module gives merge_and_unload's."""
    from peft import PeftModel

    from reprotune.loading import load_model
    from reprotune.merge import head_logits, hidden_states, hollow_peft_model, streamed, token_batch

    path = adapter if kind == "plain" else odd_adapters[kind]
    ids, mask = token_batch([list(range(7, 47))])
    model, sources = hollow_peft_model(base, path, torch.float32, False)

    def logits(merge_adapters: bool) -> torch.Tensor:
        with streamed(model, sources, base, merge_adapters):
            return head_logits(model, hidden_states(model, ids, mask)[0])

    held = {name: p.clone() for name, p in model.named_parameters() if p not in sources}  # adapter, saved layers
    unmerged, merged = logits(False), logits(True)
    for name, p in model.named_parameters():  # merging left nothing behind
        assert name not in held or torch.equal(p, held[name]), name
    whole = PeftModel.from_pretrained(load_model(base, torch.float32, False), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(unmerged, whole(input_ids=ids).logits[0], rtol=0, atol=0)
        torch.testing.assert_close(merged, whole.merge_and_unload()(input_ids=ids).logits[0], rtol=0, atol=0)


def test_tied_embeddings_merge_and_verify(base, tmp_path):
    """A tied base streams the embedding for both uses."""
    tied = tied_copy(base, tmp_path / "tied")
    make_adapter(tied, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    inputs = MergeInputs(tied, tmp_path / "adapter", tmp_path / "no-val-split")
    metrics = merge_and_verify(merge_params("fp32", 1, "2GB"), inputs, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert metrics["max_abs_diff"] <= metrics["tolerance"]


@pytest.mark.parametrize("tie", [False, True])
def test_trained_token_rows_replace_the_base_rows(base, packed, odd_adapters, tmp_path, tie):
    """trainable_token_indices: the saved rows go into the embedding and the untied head; a tied head follows
    the embedding's rows (peft ties them), and the merged checkpoint stores the matrix once."""
    from safetensors.torch import load_file

    if tie:
        model_dir = tied_copy(base, tmp_path / "tied")
        make_adapter(model_dir, tmp_path / "adapter", trainable_token_indices={"model.embed_tokens": TOKEN_IDS})
        adapter = tmp_path / "adapter"
    else:
        model_dir, adapter = base, odd_adapters["tokens"]
    (tmp_path / "out").mkdir()
    m = merge_and_verify(merge_params("fp32", 2, "2GB"), MergeInputs(model_dir, adapter, packed), tmp_path / "out")
    assert m["token_row_tensors"] == 2 - tie and m["max_abs_diff"] <= 1e-4 * max(1.0, m["logit_scale"])
    saved, start = load_file(adapter / "adapter_model.safetensors"), load_file(model_dir / "model.safetensors")
    merged = load_file(tmp_path / "out/model.safetensors")
    assert sorted(merged) == sorted(start)
    for module in ["model.embed_tokens"] + ["lm_head"] * (not tie):
        rows = saved[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        weight, before = merged[f"{module}.weight"], start[f"{module}.weight"]
        other = [i for i in range(weight.shape[0]) if i not in TOKEN_IDS]
        assert torch.equal(weight[TOKEN_IDS], rows) and not torch.equal(rows, before[TOKEN_IDS])
        assert torch.equal(weight[other], before[other])


def test_wrong_merge_fails_verification(base, adapter, packed, tmp_path, monkeypatch):
    """A merge that drops a delta is caught by the logits check, and the error says so."""
    import reprotune.merge as merge_mod

    real = merge_mod.read_adapter

    def broken(path):
        a = real(path)
        name = "model.layers.1.mlp.down_proj.weight"
        return replace(a, deltas={**a.deltas, name: replace(a.deltas[name], scale=0.0)})

    monkeypatch.setattr(merge_mod, "read_adapter", broken)
    with pytest.raises(RuntimeError, match="differ from base\\+adapter"):
        merge_and_verify(merge_params("fp32", 2, "2GB"), MergeInputs(base, adapter, packed), tmp_path)


def test_wrong_bytes_on_disk_fail_verification(base, adapter, packed, tmp_path, monkeypatch):
    """Verification reads the merged checkpoint back from disk: a tensor changed after it was written is caught."""
    import reprotune.merge as merge_mod
    from reprotune.tensors import read_index, read_tensor

    real = merge_mod.merge

    def merge_then_corrupt(base_dir, adapter_dir, out_dir, *args):
        counts = real(base_dir, adapter_dir, out_dir, *args)
        ref = read_index(out_dir)["model.layers.2.self_attn.o_proj.weight"]
        with open(ref.file, "r+b") as f:
            scaled = read_tensor(ref, f) * 1.1
            f.seek(ref.begin)
            f.write(scaled.numpy().tobytes())
        return counts

    monkeypatch.setattr(merge_mod, "merge", merge_then_corrupt)
    with pytest.raises(RuntimeError, match="differ from base\\+adapter"):
        merge_and_verify(merge_params("fp32", 2, "2GB"), MergeInputs(base, adapter, packed), tmp_path)


def test_weight_never_streamed_in_fails_verification(base, adapter, packed, tmp_path, monkeypatch):
    """A weight left as its placeholder (NaN) poisons the logits of every model: verification fails, it does
    not compare two equally wrong models."""
    import reprotune.merge as merge_mod

    real = merge_mod._units

    def without_norms(model, sources, tuner_type):
        units = real(model, sources, tuner_type)
        return {unit: parts for unit, parts in units.items() if "Norm" not in type(unit).__name__}

    monkeypatch.setattr(merge_mod, "_units", without_norms)
    with pytest.raises(RuntimeError, match="max \\|delta\\| nan"):
        merge_and_verify(merge_params("fp32", 2, "2GB"), MergeInputs(base, adapter, packed), tmp_path)


def test_unsupported_adapter_is_refused(base, adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in adapter.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        read_adapter(bad)


def test_dtype_resolution(base):
    assert resolve_dtype("auto", base) == torch.float32  # CPU: the base's stored dtype
    assert resolve_dtype("bf16", base) == torch.bfloat16
    assert resolve_dtype("fp16", base) == torch.float16


def test_plan_shards_follows_huggingface_rule():
    assert plan_shards({"a": 4, "b": 4, "c": 4}, 8) == [["a", "b"], ["c"]]
    assert plan_shards({"a": 2, "big": 20, "c": 2}, 8) == [["a"], ["big"], ["c"]]


def test_quantized_base_is_refused_as_bad_input(base, adapter, packed, tmp_path):
    """A base stored quantized is the user's input gone wrong: exit 2 with the file named, before anything
    is loaded or written."""
    quantized, out = tmp_path / "base", tmp_path / "out"
    quantized.mkdir()
    out.mkdir()
    for p in base.iterdir():
        (quantized / p.name).symlink_to(p)
    (quantized / "config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(BadInput, match=re.escape(f"{quantized / 'config.json'}: ") + ".*stored quantized"):
        merge_and_verify(merge_params("auto", 2, "2GB"), MergeInputs(quantized, adapter, packed), out)
    assert not list(out.iterdir())


def test_stage_writes_model_and_metrics_or_nothing(base, adapter, packed, tmp_path, monkeypatch):
    """stages/merge.py in a scratch repo layout, on the shipped params.yaml restricted to the keys dvc.yaml
    declares for merge (reading any other key raises); a failed verification leaves neither output."""
    import runpy

    import reprotune.merge as merge_mod

    for src, dst in (
        (base, "models/base"),
        (adapter, "models/adapter"),
        (packed, "data/packed"),
        *((REPO / name, name) for name in ("params.yaml", "dvc.yaml", "data/sample", "data/prompts")),
    ):
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dst).symlink_to(src)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages/merge.py"), run_name="__main__")
    metrics = json.loads(Path("metrics/merge.json").read_text())
    assert metrics["verify_sequences"] == 3 and metrics["shards"] == 1 and metrics["rtol"] == 1e-4
    runtime = json.loads(Path("metrics/runtime/merge.json").read_text())  # apart from the locked results
    assert runtime["seconds"] > 0 and runtime["peak_rss_mb"] > 0 and runtime["max_abs_diff"] <= runtime["tolerance"]
    assert not set(runtime) & set(metrics)
    assert (tmp_path / "models/merged/model.safetensors").is_file()

    monkeypatch.setattr(merge_mod, "RTOL", {torch.float32: -1.0})  # no tolerance at all
    monkeypatch.setattr(merge_mod, "NOISE_MARGIN", -1.0)
    Path("metrics/merge.json").unlink()
    with pytest.raises(RuntimeError):
        runpy.run_path(str(REPO / "stages/merge.py"), run_name="__main__")
    assert not Path("metrics/merge.json").exists()
    assert (tmp_path / "models/merged/model.safetensors").is_file()  # the previous output is untouched
    assert not list((tmp_path / "models").glob(".merged.tmp-*"))

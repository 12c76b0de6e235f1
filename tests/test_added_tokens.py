"""Tokens added to the vocabulary (base.tokens, new base.special_tokens): the base stage grows the embeddings
(model/vocab.py), training learns the new rows and saves only them, the merge folds them in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reprotune import testing as synthetic
from reprotune.io import sha256_tree
from reprotune.merge import MergeInputs, merge_and_verify
from reprotune.model.base import BaseInputs, resolve_base
from reprotune.packed import IGNORE_INDEX
from reprotune.stage import execute
from reprotune.train import run as run_module
from reprotune.train.run import TrainInputs

from helpers import params_with

TOKENS = ("<tool>", "</tool>")
SPECIALS = {"eos_token": "<|eos_new|>", "pad_token": "<|pad_new|>"}
VOCAB = 4096  # the built-in tokenizer's length
NEW_IDS = list(range(VOCAB, VOCAB + 4))  # the specials first (sorted by key), then TOKENS in order
SEQUENCE_LEN = 64
PARAMS = params_with(
    base={"model": "builtin:tiny-llama", "tokens": TOKENS, "special_tokens": SPECIALS},
    lora={"modules_to_save": None},  # the new rows only: peft's trainable_token_indices
    train={
        "max_steps": 2,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "save_steps": 2,
        "eval_steps": 2,
        "logging_steps": 1,
    },  # fmt: skip
    merge={"dtype": "fp32", "verify_sequences": 2, "fold_into": "original"},
    evaluate={"max_sequences": 2, "max_new_tokens": 2, "num_samples": 1, "prompts": ()},
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("base")
    return out, resolve_base(PARAMS, BaseInputs(), out)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_new_tokens_are_single_ids_with_their_roles(base):
    from transformers import AutoTokenizer

    out, prov = base
    tokenizer = AutoTokenizer.from_pretrained(out)
    added = {"<|eos_new|>": 4096, "<|pad_new|>": 4097, "<tool>": 4098, "</tool>": 4099}
    assert prov["tokenizer"]["added_tokens"] == added
    assert prov["tokenizer"]["embedding_rows"] == {"before": VOCAB, "after": VOCAB + 4}
    assert json.loads((out / "reprotune_base.json").read_text())["tokenizer"] == prov["tokenizer"]
    ids = tokenizer.encode("a <tool>x</tool><|pad_new|> b<|eos_new|>", add_special_tokens=False)
    assert [i for i in ids if i >= VOCAB] == [4098, 4099, 4097, 4096]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|eos_new|>", "<|pad_new|>")
    assert 4096 in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_embeddings_grow_by_mean_rows_and_keep_the_old_ones(base, tiny_model_dir):
    out, _ = base
    before, after = weights(tiny_model_dir), weights(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + 4
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the tiny model's head is untied
        old, new = before[name], after[name]
        assert new.shape == (VOCAB + 4, 256) and torch.equal(new[:VOCAB], old)
        torch.testing.assert_close(new[VOCAB:], old.double().mean(0).float().expand(4, -1), rtol=0, atol=1e-7)
    assert all(torch.equal(after[n], t) for n, t in before.items() if n not in ("model.embed_tokens.weight",
                                                                                 "lm_head.weight"))  # fmt: skip


def test_same_params_give_identical_bytes(base, tmp_path):
    out, _ = base
    resolve_base(PARAMS, BaseInputs(), tmp_path / "again")
    assert sha256_tree(tmp_path / "again") == sha256_tree(out)


def test_a_vocabulary_with_spare_rows_is_not_resized_but_its_new_ids_are_recorded(tiny_model_dir, tmp_path):
    src = tmp_path / "padded"  # a local base whose embeddings have 8 rows more than its tokenizer
    shutil.copytree(tiny_model_dir, src)
    padded = {n: torch.cat([t, t[:8]]) if t.shape[0] == VOCAB else t for n, t in weights(src).items()}
    save_file(padded, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "vocab_size": VOCAB + 8}))  # fmt: skip
    prov = resolve_base(params_with(base={"model": str(src), "tokens": ("<a>",)}), BaseInputs(), tmp_path / "b")
    assert prov["tokenizer"]["added_tokens"] == {"<a>": VOCAB}
    assert prov["tokenizer"]["embedding_rows"] == {"before": VOCAB + 8, "after": VOCAB + 8}
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "b" / name).read_bytes() == (src / name).read_bytes()


def packed_with_new_tokens(root: Path) -> Path:
    """data/packed whose sequences use every new token, in prompts and answers."""
    seqs = synthetic.sequences(12, seed=0, vocab=VOCAB, max_len=SEQUENCE_LEN, mean_len=40)
    for ids, labels in seqs:
        ids[1:5] = ids[-4:] = NEW_IDS  # in the prompt and at the answer's end
        supervised = labels != IGNORE_INDEX
        labels[supervised] = ids[supervised]
    synthetic.write_packed_dir(root, {"train": seqs[:10], "val": seqs[10:]}, SEQUENCE_LEN, packed=True)
    return root


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> tuple[Path, Path]:
    """The adapter after 2 optimizer steps (QLoRA, modules_to_save null) and its data/packed."""
    root = tmp_path_factory.mktemp("run")
    inputs = TrainInputs(base[0], packed_with_new_tokens(root / "data/packed"), root / "ckpt", root / "dvclive")
    execute(run_module.train, PARAMS, inputs, out=root / "adapter", metrics=root / "train.json")
    return root / "adapter", root / "data/packed"


def test_training_learns_the_new_rows_and_saves_only_them(base, trained):
    adapter, _ = trained
    saved = load_file(adapter / "adapter_model.safetensors")
    rows = {k: v for k, v in saved.items() if ".lora_" not in k}
    embed = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    head = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    assert {k: tuple(v.shape) for k, v in rows.items()} == {embed: (4, 256), head: (4, 256)}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": NEW_IDS, "lm_head": NEW_IDS}
    assert config["modules_to_save"] is None
    start = weights(base[0])
    for key, name in ((embed, "model.embed_tokens.weight"), (head, "lm_head.weight")):
        changed = (rows[key] != start[name][NEW_IDS]).any(dim=1)
        assert changed.all(), f"{name}: rows of the new tokens not all trained"


def test_merge_puts_the_trained_rows_in_and_verifies(base, trained, tmp_path):
    adapter, packed = trained
    metrics = merge_and_verify(PARAMS, MergeInputs(base[0], adapter, packed), tmp_path)
    assert metrics["token_row_tensors"] == 2 and metrics["max_abs_diff"] <= metrics["tolerance"]
    merged, start = weights(tmp_path), weights(base[0])
    saved = load_file(adapter / "adapter_model.safetensors")
    for module, name in (("model.embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        rows = saved[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        assert torch.equal(merged[name][NEW_IDS], rows)
        assert torch.equal(merged[name][:VOCAB], start[name][:VOCAB])


def test_evaluation_loads_every_model_with_the_grown_vocabulary(base, trained, tmp_path):
    from reprotune.evaluate import EvaluateInputs, evaluate

    adapter, packed = trained
    (tmp_path / "merged").mkdir()
    merge_and_verify(PARAMS, MergeInputs(base[0], adapter, packed), tmp_path / "merged")
    metrics = evaluate(PARAMS, EvaluateInputs(base[0], adapter, tmp_path / "merged", packed), tmp_path)
    losses = [metrics[m]["loss"] for m in ("base", "as_trained", "as_shipped")]
    assert all(np.isfinite(losses)) and losses[0] != losses[2]


def test_a_sharded_base_rewrites_only_the_shards_with_embeddings(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(src, max_shard_size="5MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # no chat template: a base model, say
        shutil.copy(tiny_model_dir / name, src)
    resolve_base(params_with(base={"model": str(src), "tokens": TOKENS}), BaseInputs(), tmp_path / "b")
    index = json.loads((tmp_path / "b/model.safetensors.index.json").read_text())
    grown = {index["weight_map"][n] for n in ("model.embed_tokens.weight", "lm_head.weight")}
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > len(grown) and grown < set(shards)
    for name in shards:  # the other shards are copied as they were
        assert ((tmp_path / "b" / name).read_bytes() == (src / name).read_bytes()) == (name not in grown)
    sizes = sum(p.stat().st_size for p in (tmp_path / "b").glob("*.safetensors"))
    assert 0 < sizes - index["metadata"]["total_size"] < 1000 * len(shards)  # data bytes; headers apart
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert model.get_input_embeddings().weight.shape == model.get_output_embeddings().weight.shape == (VOCAB + 2, 256)

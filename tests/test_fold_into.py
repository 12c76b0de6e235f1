"""merge.fold_into: the shipped model equals the trained one when the adapter is folded into the 4-bit
weights it was trained against, and differs when folded into the original weights (QLoRA's gap).

The built-in tiny model with a random non-zero LoRA adapter, the merge stage's core for both choices, and
the evaluate stage's loaders for "as trained" (adapter on the 4-bit base) and "as shipped" (merged).
"""

from __future__ import annotations

import pytest
import torch

from reprotune.evaluate import compare
from reprotune.loading import load_model
from reprotune.merge import MergeInputs, merge_and_verify
from reprotune.quant import load_as_trained

from helpers import params_with
from test_merge import make_adapter, write_packed

GAP_RTOL = 1e-5  # dequantized fold: fp32 rounding only


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):
    adapter = tmp_path_factory.mktemp("adapter")
    make_adapter(tiny_model_dir, adapter, lora_dropout=0.3)  # evaluation must switch dropout off
    seq = lambda n, s: (list(range(s, s + n)), [-100] * (n // 2) + list(range(s + n // 2, s + n)))  # noqa: E731
    packed = write_packed(tmp_path_factory.mktemp("data") / "packed", [[seq(24, 10), seq(16, 300)], [seq(30, 900)]])
    return tiny_model_dir, adapter, packed


def gap(case, fold_into: str, tmp_path) -> tuple[dict, dict]:
    base, adapter, packed = case
    params = params_with(merge={"fold_into": fold_into, "dtype": "fp32", "verify_sequences": 2})
    merged = tmp_path / fold_into
    merged.mkdir()
    merge_metrics = merge_and_verify(params, MergeInputs(base, adapter, packed), merged)
    loaders = {
        "as_trained": lambda: load_as_trained(base, adapter, params.quant, params.train, False),
        "as_shipped": lambda: load_model(merged, torch.float32, False),
    }
    cfg = params_with(evaluate={"max_new_tokens": 4, "num_samples": 0, "prompts": []}).evaluate
    metrics, _ = compare(loaders, merged, packed, cfg)
    return merge_metrics, metrics


def test_dequantized_fold_ships_the_trained_model(case, tmp_path):
    merge_metrics, metrics = gap(case, "dequantized", tmp_path)
    assert merge_metrics["fold_into"] == "dequantized"
    assert merge_metrics["max_abs_diff"] <= merge_metrics["tolerance"]  # verified against the dequantized base
    trained, shipped = metrics["as_trained"]["loss"], metrics["as_shipped"]["loss"]
    assert abs(shipped - trained) <= GAP_RTOL * trained
    assert metrics["shipped_vs_trained"]["answers_differ"] == 0


def test_original_fold_differs_from_the_trained_model_by_the_4bit_error(case, tmp_path):
    _, original = gap(case, "original", tmp_path)
    _, dequantized = gap(case, "dequantized", tmp_path)
    assert original["as_trained"] == dequantized["as_trained"]  # the same trained model, deterministically
    # folding into the 16/32-bit weights ships another model: its loss moves by the 4-bit rounding error
    assert abs(original["shipped_vs_trained"]["loss"]) > 100 * max(abs(dequantized["shipped_vs_trained"]["loss"]), 1e-7)

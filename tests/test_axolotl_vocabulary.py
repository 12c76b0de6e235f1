"""Axolotl's vocabulary beyond the datasets: its optimizers and Adam's hyperparameters, batch_size,
eval_batch_size, early stopping, its schedulers, speed- and observability-only keys, and numbers as its
users write them (YAML 1.1 reads `2e-5` as a string, Axolotl as a number)."""

import pytest
import yaml
from conftest import REPO

from reprotune.axolotl import IGNORED, TRANSLATED, UNSUPPORTED, params_from
from reprotune.config.check import check_params, load_params
from reprotune.config.sections import OPTIMIZERS

BASE = {
    "base_model": "builtin:tiny-llama",
    "adapter": "qlora",
    "load_in_4bit": True,
    "datasets": [{"path": "data/sample/alpaca.jsonl", "type": "alpaca"}],
}


def imported(**keys) -> tuple[dict, dict]:
    """(params, {key: row}) of an Axolotl config of BASE plus `keys`; the params must pass the check."""
    params, rows = params_from({**BASE, **keys})
    _, problems = check_params(params, REPO)
    assert problems == [], problems
    return params, {row.key: row for row in rows}


@pytest.mark.parametrize(
    "axolotl, ours",
    [
        ("adamw_bnb_8bit", "adamw_bnb_8bit"),
        ("adamw_8bit", "adamw_bnb_8bit"),
        ("adamw_torch_4bit", "adamw_torch_4bit"),
        ("adamw_torch_8bit", "adamw_torch_8bit"),
        ("ao_adamw_8bit", "adamw_torch_8bit"),
        ("adamw_torch_fused", "adamw_torch_fused"),
        ("paged_adamw_32bit", "paged_adamw_32bit"),
        ("paged_adamw_8bit", "paged_adamw_8bit"),
        ("adamw_hf", "adamw_torch"),
    ],
)
def test_axolotls_optimizers_import_by_the_trainers_names(axolotl, ours):
    params, _ = imported(optimizer=axolotl)
    assert params["train"]["optimizer"] == ours and ours in OPTIMIZERS


def test_an_optimizer_we_lack_is_refused_with_the_list():
    _, rows = params_from({**BASE, "optimizer": "muon"})
    row = next(r for r in rows if r.key == "optimizer")
    assert row.status == UNSUPPORTED and "adamw_bnb_8bit" in row.note


def test_adams_hyperparameters_are_train_keys():
    params, _ = imported(adam_beta1=0.85, adam_beta2=0.95, adam_epsilon=1e-6)
    assert {k: params["train"][k] for k in ("adam_beta1", "adam_beta2", "adam_epsilon")} == {
        "adam_beta1": 0.85,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
    }


@pytest.mark.parametrize(
    "keys, micro, accumulation",
    [
        ({"batch_size": 16, "micro_batch_size": 4}, 4, 4),  # Axolotl: accumulation = batch_size // micro
        ({"batch_size": 8}, 1, 8),  # Axolotl's micro_batch_size default is 1
        ({"batch_size": 16, "micro_batch_size": 4, "gradient_accumulation_steps": 4}, 4, 4),  # both, agreeing
    ],
)
def test_batch_size_becomes_gradient_accumulation_as_axolotl_derives_it(keys, micro, accumulation):
    params, rows = imported(**keys)
    assert (params["train"]["micro_batch_size"], params["train"]["gradient_accumulation_steps"]) == (
        micro,
        accumulation,
    )
    assert rows["batch_size"].status == TRANSLATED


def test_a_batch_size_that_contradicts_the_other_two_is_refused():
    _, rows = params_from({**BASE, "batch_size": 10, "micro_batch_size": 4, "gradient_accumulation_steps": 4})
    assert next(r for r in rows if r.key == "batch_size").status == UNSUPPORTED


def test_eval_batch_size_and_early_stopping():
    params, _ = imported(eval_batch_size=8, early_stopping_patience=3, eval_steps=10, save_steps=20)
    assert params["train"]["eval_batch_size"] == 8 and params["train"]["early_stopping_patience"] == 3


@pytest.mark.parametrize(
    "keys, scheduler, floor",
    [
        ({"lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1}, "cosine", 0.1),
        ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.05}}, "cosine", 0.05),
        ({"lr_scheduler": "constant_with_warmup"}, "constant_with_warmup", None),
        ({"lr_scheduler": "polynomial"}, "polynomial", None),
    ],
)
def test_axolotls_schedulers(keys, scheduler, floor):
    params, _ = imported(**keys)
    assert (params["train"]["lr_scheduler"], params["train"]["cosine_min_lr_ratio"]) == (scheduler, floor)


def test_scheduler_arguments_that_cannot_be_carried_are_named():
    _, rows = params_from({**BASE, "lr_scheduler": "cosine", "lr_scheduler_kwargs": {"num_cycles": 2}})
    row = next(r for r in rows if r.key == "lr_scheduler_kwargs")
    assert row.status == UNSUPPORTED and "num_cycles" in row.note


@pytest.mark.parametrize("key", ["low_cpu_mem_usage", "use_otel_metrics", "otel_metrics_port"])
def test_speed_and_observability_keys_are_ignored_with_the_reason(key):
    _, rows = imported(**{key: True if key != "otel_metrics_port" else 8000})
    assert rows[key].status == IGNORED and rows[key].note


@pytest.mark.parametrize("key", ["flex_attention", "xformers_attention"])
def test_other_attention_kernels_train_the_same_model_with_sdpa(key):
    params, rows = imported(**{key: True})
    assert params["train"]["attn_implementation"] == "sdpa" and rows[key].status == TRANSLATED


def test_numbers_as_axolotl_users_write_them():
    text = "learning_rate: 2e-5\nweight_decay: 1E-2\nlora_dropout: '0.1'\nmax_steps: '100'\n"
    params, _ = imported(**yaml.safe_load(text))
    train = params["train"]
    assert (train["learning_rate"], train["weight_decay"], train["max_steps"]) == (2e-5, 0.01, 100)
    assert params["lora"]["dropout"] == 0.1


def test_a_written_params_file_reads_back_as_numbers(tmp_path):
    """params.yaml with `learning_rate: 2e-5`: a number to DVC (YAML 1.2) and to the stages alike."""
    text = (REPO / "params.yaml").read_text().replace("learning_rate: 0.005", "learning_rate: 2e-5")
    (tmp_path / "params.yaml").write_text(text)
    for link in ("data", "models"):
        (tmp_path / link).symlink_to(REPO / link)
    assert load_params(tmp_path / "params.yaml").train.learning_rate == 2e-5


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "learning_rate", "fast", 'train.learning_rate: got "fast"; expected a number'),
        ("train", "max_steps", "1e3", 'train.max_steps: got "1e3"; expected an integer'),
    ],
)
def test_a_string_that_is_not_a_number_names_the_key(section, key, value, message):
    _, problems = check_params({section: {key: value}}, REPO)
    assert message in [str(p) for p in problems]


def test_the_import_leaves_the_config_as_given():
    cfg = {**BASE, "learning_rate": "2e-5"}
    params, _ = params_from(cfg)
    assert params["train"]["learning_rate"] == 2e-5 and cfg["learning_rate"] == "2e-5"


def test_zero_intervals_are_unset_as_axolotl_reads_them():
    params, rows = imported(evals_per_epoch=0, saves_per_epoch=4)
    assert rows["evals_per_epoch"].status == IGNORED and params["train"]["evals_per_epoch"] is None
    assert params["train"]["saves_per_epoch"] == 4


def test_batch_size_with_accumulation_writes_axolotls_micro_batch():
    params, _ = imported(batch_size=8, gradient_accumulation_steps=8)  # micro_batch_size unset: Axolotl's 1
    assert (params["train"]["micro_batch_size"], params["train"]["gradient_accumulation_steps"]) == (1, 8)


@pytest.mark.parametrize("order", [0, 1])
def test_save_strategy_epoch_yields_to_explicit_steps_in_any_key_order(order):
    keys = [("save_strategy", "epoch"), ("save_steps", 100)]
    params, _ = imported(**dict(keys if order else keys[::-1]))
    assert (params["train"]["save_steps"], params["train"]["saves_per_epoch"]) == (100, None)

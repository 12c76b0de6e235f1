"""params.yaml checks: each schema and cross-field rule, all problems at once, exit codes, speed."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reprotune.config import ParamsError, check_params, load_params
from reprotune.config.sections import SECTION_TYPES, DatasetConfig, MessageMapping, Params, key
from reprotune.schema import SCHEMA_FILE, class_doc, field_docs, generate_schema, render

REPO = Path(__file__).resolve().parents[1]


def problems(raw: dict, root: Path = REPO) -> dict[str, str]:
    _, found = check_params(raw, repo_root=root)
    messages: dict[str, str] = {}
    for p in found:
        messages[p.path] = f"{messages[p.path]} | {p.message}" if p.path in messages else p.message
    return messages


def test_shipped_params_are_clean():
    params = load_params(REPO / "params.yaml")
    assert params.base.model == "builtin:tiny-llama"
    assert params.tokenize.roles_to_train == ("assistant",)
    assert params.data.datasets[1].message_property_mappings.role == "from"


def test_an_empty_mapping_gets_every_default_and_an_empty_file_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "data/sample").mkdir(parents=True)
    (tmp_path / "data/sample/alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "data/prompts").mkdir()
    (tmp_path / "data/prompts/general.jsonl").write_text('{"prompt": "Hi?"}\n')  # evaluate.general_prompts
    params = load_params(tmp_path / "params.yaml")
    assert params.tokenize.sequence_len == 2048
    assert params.lora.r == 32 and params.lora.alpha == 16  # Axolotl's QLoRA example
    (tmp_path / "params.yaml").write_text("")  # an interrupted write, more likely than a wish for defaults
    with pytest.raises(
        ParamsError,
        match=r"params.yaml: is empty; expected a params file of sections \(a YAML mapping\); `\{\}` takes every",
    ):
        load_params(tmp_path / "params.yaml")


def test_schema_file_is_generated_from_the_dataclasses():
    # Text equality: also catches 16 vs 16.0 and key order, which dict equality would let through.
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render(generate_schema()), (
        "params.schema.json differs from the dataclasses in sections.py: run `make schema`"
    )


def test_every_field_and_section_has_a_description():
    for cls in (*SECTION_TYPES.values(), DatasetConfig, MessageMapping):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"
    for cls in (*SECTION_TYPES.values(), Params):
        assert (class_doc(cls) or "").strip(), f"{cls.__name__} has no docstring"


def test_key_rejects_a_misspelt_constraint():
    with pytest.raises(TypeError, match="minimun"):
        key(1, minimun=0)


def test_every_key_in_params_yaml_is_commented():
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        is_section = line and not line[0].isspace() and line.rstrip().endswith(":")
        if line.strip() and not line.lstrip().startswith("#") and not is_section:
            assert "#" in line, f"params.yaml:{number} has no comment: {line}"


@pytest.mark.parametrize(
    "raw, path, fragment",
    [
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate", "expected a number"),
        ({"train": {"optimizer": "sgd"}}, "train.optimizer", 'allowed: "adamw_torch"'),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", "must be >= 1"),
        ({"lora": {"dropout": 1}}, "lora.dropout", "must be < 1"),
        ({"tokenize": {"sequence_len": True}}, "tokenize.sequence_len", "expected an integer"),
        ({"tokenize": {"roles_to_train": []}}, "tokenize.roles_to_train", "at least 1"),
        ({"tokenize": {"roles_to_train": ["robot"]}}, "tokenize.roles_to_train[0]", "allowed"),
        ({"export": {"max_shard_size": "2 gigs"}}, "export.max_shard_size", "500MB or 2GB"),
        ({"export": {"formats": ["gguf", "gguf"]}}, "export.formats", "must not repeat"),
        ({"data": {"datasets": [{"type": "alpaca"}]}}, "data.datasets[0].path", "required key is missing"),
        (
            {"data": {"datasets": [{"path": "data/sample/alpaca.jsonl", "type": "sharegpt"}]}},
            "data.datasets[0].type",
            "allowed",
        ),
        ({"data": {"datasets": "data/sample/alpaca.jsonl"}}, "data.datasets", "expected a list"),
        ({"train": 5}, "train", "expected a mapping"),
    ],
)
def test_schema_rules(raw, path, fragment):
    found = problems(raw)
    assert path in found, found
    assert fragment in found[path]


@pytest.mark.parametrize(
    "raw, path, fragment",
    [
        ({"tokenize": {"sequence_lenght": 512}}, "tokenize.sequence_lenght", "did you mean 'sequence_len'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"lora": {"zzz": 1}}, "lora.zzz", "known keys: r, alpha"),
        (
            {"data": {"datasets": [{"path": "data/sample/alpaca.jsonl", "type": "alpaca", "feild_output": "o"}]}},
            "data.datasets[0].feild_output",
            "did you mean 'field_output'",
        ),
    ],
)
def test_unknown_keys_suggest_the_nearest(raw, path, fragment):
    assert fragment in problems(raw)[path]


@pytest.mark.parametrize(
    "raw, path, fragment",
    [
        ({"train": {"warmup_ratio": 0.1, "warmup_steps": 10}}, "train.warmup_steps", "not both"),
        ({"train": {"bf16": True, "fp16": True}}, "train.fp16", "exclusive"),
        ({"train": {"evals_per_epoch": 2}}, "train.evals_per_epoch", "exactly one of train.eval_steps"),
        ({"base": {"chat_template": "jinja"}}, "base.chat_template_jinja", "exactly when base.chat_template is jinja"),
        ({"train": {"save_steps": None}}, "train.saves_per_epoch", "exactly one of train.save_steps"),
        ({"tokenize": {"val_set_size": 1.5}}, "tokenize.val_set_size", "whole number"),
        ({"tokenize": {"sequence_len": 4096}}, "tokenize.sequence_len", "at most 2048"),
        ({"lora": {"target_modules": ["q_proj"]}}, "lora.target_modules", "not both"),
        ({"lora": {"target_linear": False}}, "lora.target_modules", "nothing to adapt"),
        ({"export": {"formats": ["gguf"]}}, "export.formats", "safetensors is always exported"),
        ({"base": {"model": "builtin:huge-llama"}}, "base.model", "built-in models: builtin:tiny-llama"),
        ({"base": {"revision": "main"}}, "base.revision", "hub ids only"),
        ({"base": {"model": "meta-llama/Llama-3.1-8B"}}, "base.revision", "must be pinned"),
        ({"base": {"model": "./no/such/folder"}}, "base.model", "not a built-in name"),
        ({"base": {"model": "data"}}, "base.model", "must lie under models/local/"),
        (
            {"data": {"datasets": [{"path": "data/sample/nope.jsonl", "type": "alpaca"}]}},
            "data.datasets[0].path",
            "does not exist",
        ),
        (
            {"data": {"datasets": [{"path": "data/sample", "type": "alpaca", "data_files": ["../raw/*.jsonl"]}]}},
            "data.datasets[0].data_files[0]",
            "no absolute path, no ..",
        ),
        (
            {"data": {"datasets": [{"path": "data/sample", "type": "alpaca", "data_files": ["*.jsonl", "x*"]}]}},
            "data.datasets[0].data_files[1]",
            "matches no file in data/sample",
        ),
        (
            {"data": {"datasets": [{"path": "data/sample/alpaca.jsonl", "type": "alpaca", "data_files": ["a"]}]}},
            "data.datasets[0].data_files",
            "this path is a file",
        ),
        (
            {"data": {"datasets": [{"path": "data/sample", "type": "alpaca", "name": "x"}]}},
            "data.datasets[0].name",
            "hub datasets only",
        ),
        (
            {"data": {"datasets": [{"path": "org/ds", "type": "alpaca", "ds_type": "json"}]}},
            "data.datasets[0].ds_type",
            "local files only",
        ),
        (
            {"data": {"datasets": [{"path": "org/ds", "type": "alpaca", "shards": 2, "shards_idx": 2}]}},
            "data.datasets[0].shards_idx",
            "below shards (2)",
        ),
        (
            {"data": {"datasets": [{"path": "org/ds", "type": "alpaca", "shards_idx": 1}]}},
            "data.datasets[0].shards_idx",
            "only with shards",
        ),
        (
            {"data": {"datasets": [{"path": "org/ds", "type": "alpaca", "roles_to_train": ["user"]}]}},
            "data.datasets[0].roles_to_train",
            "applies to type chat",
        ),
        (
            {"data": {"test_datasets": [{"path": "org/ds", "type": "alpaca"}]}},
            "tokenize.val_set_size",
            "data.test_datasets is the validation set",
        ),
        (
            {
                "data": {"test_datasets": [{"path": "org/ds", "type": "alpaca", "weight": 2}]},
                "tokenize": {"val_set_size": 0},
            },
            "data.test_datasets[0].weight",
            "not weighted",
        ),
        (
            {
                "data": {"test_datasets": [{"path": "data/sample/nope.jsonl", "type": "alpaca"}]},
                "tokenize": {"val_set_size": 0},
            },
            "data.test_datasets[0].path",
            "does not exist",
        ),
        (
            {"data": {"datasets": [{"path": "pyproject.toml", "type": "alpaca"}]}},
            "data.datasets[0].path",
            "must lie under data/raw/",
        ),
        (
            {"data": {"datasets": [{"path": "data/sample/alpaca.jsonl", "type": "alpaca", "field_messages": "m"}]}},
            "data.datasets[0].field_messages",
            "applies to type chat only",
        ),
        (
            {"data": {"replay": {"source": "prompts", "prompts": "data/sample/alpaca.jsonl"}}},
            "data.replay.prompts",
            "must lie under data/prompts/",
        ),  # fmt: skip
        (
            {"data": {"replay": {"source": "prompts", "prompts": "data/prompts/nope.jsonl"}}},
            "data.replay.prompts",
            "does not exist",
        ),  # fmt: skip
        ({"data": {"replay": {"weight": 1}}}, "data.replay.weight", "must be < 1"),
        ({"evaluate": {"general_prompts": "README.md"}}, "evaluate.general_prompts", "must lie under data/prompts/"),
        ({"evaluate": {"general_prompts": "data/prompts/x.txt"}}, "evaluate.general_prompts", "does not exist"),
    ],
)
def test_cross_field_rules(raw, path, fragment):
    found = problems(raw)
    assert path in found, found
    assert fragment in found[path]


def test_hub_ids_pass_when_pinned():
    assert (
        problems(
            {
                "base": {"model": "meta-llama/Llama-3.1-8B", "revision": "main"},
                "data": {"datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}]},
            }
        )
        == {}
    )


def test_unknown_data_suffix(tmp_path):
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/x.xml").write_text("hi")
    assert (
        "unknown file type"
        in problems({"data": {"datasets": [{"path": "data/raw/x.xml", "type": "completion"}]}}, tmp_path)[
            "data.datasets[0].path"
        ]
    )


FIVE_MISTAKES = """\
base:
  model: meta-llama/Llama-3.1-8B
data:
  datasets:
    - path: data/sample/missing.jsonl
      type: alpaca
tokenize:
  sequence_lenght: 1024
train:
  learning_rate: fast
  warmup_ratio: 0.1
  warmup_steps: 10
"""


def test_cli_lists_all_five_problems_and_exits_2_fast(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(FIVE_MISTAKES)
    (tmp_path / "data/prompts").mkdir(parents=True)
    (tmp_path / "data/prompts/general.jsonl").write_text('{"prompt": "Hi?"}\n')  # evaluate.general_prompts
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "reprotune.cli", "check", str(params)], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    for path in (
        "base.revision",
        "data.datasets[0].path",
        "tokenize.sequence_lenght",
        "train.learning_rate",
        "train.warmup_steps",
    ):
        assert path in result.stderr, result.stderr
    assert "5 problems" in result.stderr
    assert elapsed < 10  # the 3 s figure is measured by `make bench`; this only catches a torch import


def test_check_imports_no_torch():
    code = "import sys, reprotune.cli, reprotune.data.validate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_ok_exit_0():
    result = subprocess.run(
        [sys.executable, "-m", "reprotune.cli", "check", str(REPO / "params.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match=r"p.yaml: expected a params file of sections .*, this file holds a list"):
        load_params(bad)


def test_load_params_raises_with_every_problem(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"seed": -1, "lr_scheduler": "step"}}))
    with pytest.raises(ParamsError) as e:
        load_params(tmp_path / "params.yaml")
    assert {p.path for p in e.value.problems} >= {"train.seed", "train.lr_scheduler"}


def test_an_optional_choice_may_be_written_null():
    ds = {"path": "data/sample/chat.jsonl", "type": "chat", "ds_type": None, "train_on_eos": None, "shards": None}
    assert problems({"data": {"datasets": [ds]}}) == {}

"""`reprotune import-axolotl` on ten Axolotl-style configs (tests/fixtures/axolotl/): the table accounts
for every key, the exit code says whether all of them can be honoured, every output passes the params
check, and one of them runs end to end on the built-in model with the shipped data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHORT_RUN, copy_repo

from reprotune import cli
from reprotune.axolotl import IGNORED, MAPPED, TRANSLATED, UNSUPPORTED, key_map_markdown, translate
from reprotune.config.check import check_params
from reprotune.train.trackers import KEYS as TRACKER_KEYS

CONFIGS = REPO / "tests/fixtures/axolotl"
BIN = Path(sys.executable).parent
# config -> (exit code, the keys that cannot be honoured)
EXPECTED = {
    "qlora_chat_template": (0, set()),
    "lora_alpaca": (0, set()),
    "builtin_end_to_end": (0, set()),
    "wandb_and_speed": (0, set()),
    "special_tokens": (0, set()),  # pad/eos roles and an added token
    "rl_dpo": (2, {"rl", "load_in_8bit", "datasets[0].type", "dpo_beta"}),
    "vision": (2, {"processor_type", "skip_prepare_dataset", "image_size"}),  # its chat_template qwen2_vl is known
    "deepspeed": (2, {"deepspeed", "adapter"}),
    "mixed_datasets": (2, {"my_experimental_flag"}),
    "completion_8bit": (2, {"load_in_8bit"}),
}


def test_the_fixtures_are_the_ten_configs():
    assert sorted(p.stem for p in CONFIGS.glob("*.yml")) == sorted(EXPECTED)


def import_config(name: str, tmp_path: Path, monkeypatch, capsys) -> tuple[int, str, Path]:
    monkeypatch.chdir(REPO)  # paths in the configs are relative to the project, as for a user
    out = tmp_path / "params.yaml"
    code = cli.main(["import-axolotl", str(CONFIGS / f"{name}.yml"), "-o", str(out)])
    return code, capsys.readouterr().out, out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_import_accounts_for_every_key_and_the_output_passes_the_check(name, tmp_path, monkeypatch, capsys):
    code, printed, out = import_config(name, tmp_path, monkeypatch, capsys)
    cfg = yaml.safe_load((CONFIGS / f"{name}.yml").read_text())
    rows = {line.split()[0]: line for line in printed.splitlines()[1:] if line and not line.startswith(" ")}
    expected_keys = set(cfg) | {
        f"{group}[{i}].{k}"
        for group in ("datasets", "test_datasets")
        for i, d in enumerate(cfg.get(group, []))
        for k in d
    }
    assert expected_keys <= set(rows), expected_keys - set(rows)
    unsupported = {key for key, line in rows.items() if f"  {UNSUPPORTED}  " in line}
    assert (code, unsupported) == EXPECTED[name], printed
    _, problems = check_params(yaml.safe_load(out.read_text()), repo_root=REPO)
    assert problems == [], problems
    # the project's params.yaml lends its comments: every commented line of it is still commented
    template = (REPO / "params.yaml").read_text().splitlines()
    template_comments = [line.split("#", 1)[1] for line in template if "#" in line]
    written = out.read_text()
    assert sum(comment in written for comment in template_comments) >= 0.9 * len(template_comments)


def test_values_are_axolotls_and_pairs_are_read_together():
    cfg = yaml.safe_load((CONFIGS / "lora_alpaca.yml").read_text())
    values, _ = translate(cfg)
    assert values["lora.target_modules"] == ["q_proj", "v_proj"] and values["lora.target_linear"] is False
    assert values["quant.load_in_4bit"] is False  # adapter lora on a 16-bit base
    assert values["train.optimizer"] == "adamw_torch_fused"
    assert values["train.seed"] == values["tokenize.seed"] == 7
    assert values["train.eval_steps"] == 20 and values["train.evals_per_epoch"] is None
    assert values["base.revision"] == "fe8a4ea1ffedaf415f4da2f062534de366a451e6"

    values, rows = translate(yaml.safe_load((CONFIGS / "qlora_chat_template.yml").read_text()))
    assert values["base.revision"] == "main"  # a hub id without a revision: main, and a line says to pin it
    assert values["train.evals_per_epoch"] == 4 and values["train.eval_steps"] is None
    assert values["data.datasets"][0]["train_on_eos"] == "turn"
    assert values["data.datasets"][0]["roles_to_train"] == ["assistant"]
    status = {row.key: row.status for row in rows}
    assert status["wandb_project"] == IGNORED  # empty: unset, as Axolotl reads it
    assert status["plugins"] == IGNORED and status["dataset_prepared_path"] == IGNORED
    assert status["optimizer"] == TRANSLATED and status["lora_r"] == MAPPED

    values, rows = translate(yaml.safe_load((CONFIGS / "wandb_and_speed.yml").read_text()))
    assert values["quant.bnb_4bit_quant_type"] == "nf4" and values["train.gradient_checkpointing"] is True
    assert values["train.attn_implementation"] == "flash_attention_2"
    assert values["train.report_to"] == ["dvclive", "wandb"]
    assert (values["train.wandb_project"], values["train.wandb_entity"], values["train.wandb_name"]) == (
        "qwen-sft",
        "my-team",
        "run-1",
    )
    status = {row.key: row.status for row in rows}
    assert status["wandb_watch"] == status["wandb_log_model"] == IGNORED


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {"wandb_project": "p", "wandb_mode": "offline"},
            {"report_to": ["dvclive", "wandb"], "wandb_project": "p", "wandb_mode": "offline"},
        ),
        ({"wandb_name": "n"}, {}),  # no wandb_project: W&B is off in Axolotl, so is the name
        (
            {"wandb_project": "p", "wandb_run_id": "abc"},
            {"report_to": ["dvclive", "wandb"], "wandb_project": "p", "wandb_name": "abc"},
        ),
        (
            {"mlflow_tracking_uri": "http://mlflow:5000", "mlflow_experiment_name": "e", "mlflow_run_name": "r"},
            {
                "report_to": ["dvclive", "mlflow"],
                "mlflow_tracking_uri": "http://mlflow:5000",
                "mlflow_experiment_name": "e",
                "mlflow_run_name": "r",
            },
        ),
        (  # one run name for both: W&B's, as Axolotl gives the Trainer
            {"wandb_project": "p", "wandb_name": "w", "mlflow_experiment_name": "e", "mlflow_run_name": "r"},
            {
                "report_to": ["dvclive", "wandb", "mlflow"],
                "wandb_project": "p",
                "wandb_name": "w",
                "mlflow_experiment_name": "e",
            },
        ),
        ({"use_tensorboard": True}, {"report_to": ["dvclive", "tensorboard"]}),
        ({"use_mlflow": True}, {"report_to": ["dvclive", "mlflow"]}),
    ],
)
def test_tracker_keys_map_onto_report_to_and_pass_the_check(config, expected, tmp_path):
    values, rows = translate({"base_model": "builtin:tiny-llama", "adapter": "qlora", **config})
    train = {k.removeprefix("train."): v for k, v in values.items() if k.startswith("train.")}
    assert {k: v for k, v in train.items() if k in TRACKER_KEYS} == expected
    assert all(row.status != UNSUPPORTED for row in rows if row.key in config), rows
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    assert not check_params(yaml.safe_load(path.read_text()))[1]  # report_to and the names agree


def test_an_unknown_key_is_never_dropped_silently():
    _, rows = translate({"base_model": "builtin:tiny-llama", "sample_packing_bin_size": 200})
    [row] = [r for r in rows if r.key == "sample_packing_bin_size"]
    assert row.status == UNSUPPORTED and "not a key this importer knows" in row.note


def test_both_spellings_of_the_message_keys_merge_and_a_contradiction_is_said():
    entry = {"path": "data/sample/chat.jsonl", "type": "chat_template", "message_field_content": "value"}
    mapping = {"role": "from"}
    values, _ = translate({"datasets": [{**entry, "message_property_mappings": mapping}]})
    assert values["data.datasets"][0]["message_property_mappings"] == {"content": "value", "role": "from"}
    assert mapping == {"role": "from"}  # the user's config is read, not changed
    _, rows = translate({"datasets": [{**entry, "message_property_mappings": {"content": "text"}}]})
    [row] = [r for r in rows if r.key == "datasets[0].message_property_mappings"]
    assert row.status == UNSUPPORTED and "contradicts" in row.note


def test_qlora_with_load_in_4bit_false_is_refused_in_either_key_order():
    for cfg in ({"adapter": "qlora", "load_in_4bit": False}, {"load_in_4bit": False, "adapter": "qlora"}):
        values, rows = translate(cfg)
        assert "quant.load_in_4bit" not in values
        assert {r.key: r.status for r in rows}["adapter"] == UNSUPPORTED
    assert translate({"load_in_4bit": True, "adapter": "lora"})[0]["quant.load_in_4bit"] is True
    assert translate({"load_in_4bit": True})[0]["quant.load_in_4bit"] is True


def test_bnb_options_that_cannot_be_carried_are_said_and_an_empty_adapter_once():
    _, rows = translate({"bnb_config_kwargs": {"llm_int8_has_fp16_weight": True, "bnb_4bit_quant_type": "nf4"}})
    [row] = rows[:1]
    assert row.status == UNSUPPORTED and "llm_int8_has_fp16_weight" in row.note
    _, rows = translate({"adapter": None})
    assert [(r.key, r.status) for r in rows] == [("adapter", UNSUPPORTED)]


def test_readme_key_map_is_generated_from_the_importer():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- axolotl-key-map:start[^>]*-->\n(.*?)\n<!-- axolotl-key-map:end -->", readme, re.S)
    assert block, "README has no generated key map"
    assert block.group(1) == key_map_markdown(), "regenerate it: python -m reprotune.axolotl README.md"


def test_an_imported_config_runs_end_to_end_on_the_builtin_model(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    imported = subprocess.run(
        [str(BIN / "reprotune"), "import-axolotl", str(CONFIGS / "builtin_end_to_end.yml")],
        cwd=repo, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stdout + imported.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["max_steps"] == 4 and params["train"]["evals_per_epoch"] == 2
    # evaluate and merge have no Axolotl keys: cut them to a few sequences so the test stays short
    for section in ("evaluate", "merge"):
        params[section].update(SHORT_RUN[section])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all(f"Running stage '{stage}'" in run.stdout for stage in stages), run.stdout
    validated = json.loads((repo / "metrics/validate.json").read_text())
    tokenized = json.loads((repo / "metrics/tokenize.json").read_text())
    # test_datasets' shard: 100 conversations, read first; their copies in the training chat file are dropped
    assert validated["per_source"]["data/sample/chat.jsonl"]["duplicates"] == 100
    assert tokenized["splits"]["val"]["records"] == 100 and tokenized["splits"]["train"]["records"] == 2900
    assert tokenized["weights"]["data/sample/alpaca.jsonl"] == {
        "weight": 0.5, "train_records": 2000, "train_copies": 1000
    }  # fmt: skip
    base = json.loads((repo / "models/base/reprotune_base.json").read_text())["tokenizer"]
    assert base["added_tokens"] == {"<|tool_call|>": 4096} and base["embedding_rows"] == {"before": 4096, "after": 4097}
    assert json.loads((repo / "models/export/config.json").read_text())["vocab_size"] == 4097
    train = yaml.safe_load((repo / "metrics/train.json").read_text())
    assert train["steps"] == 4 and train["eval_steps"] >= 1  # evals_per_epoch turned into steps

"""Axolotl's own example QLoRA configs (tests/fixtures/axolotl/examples/, copied from its repository) through
`reprotune import-axolotl`: each one imports with exit 0 and passes the params check, or is stopped by exactly
the keys expected_unsupported.json lists (MoE expert options, Mistral's own tokenizer library, ...)."""

import json

import pytest
import yaml
from conftest import REPO

from reprotune import cli
from reprotune.config.check import check_params

EXAMPLES = REPO / "tests/fixtures/axolotl/examples"
EXPECTED = json.loads((EXAMPLES / "expected_unsupported.json").read_text())


def test_every_example_has_an_expectation():
    assert sorted(p.name for p in EXAMPLES.glob("*.y*ml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_imports_or_names_what_stops_it(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "params.yaml"
    code = cli.main(["import-axolotl", str(EXAMPLES / name), "-o", str(out)])
    printed = capsys.readouterr().out
    unsupported = sorted({line.split()[0] for line in printed.splitlines() if "  unsupported  " in line})
    assert unsupported == EXPECTED[name], printed
    _, problems = check_params(yaml.safe_load(out.read_text()), repo_root=REPO)
    assert problems == []
    assert code == (2 if unsupported else 0)


FSDP_EXAMPLES = REPO / "tests/fixtures/axolotl/examples_fsdp"
FSDP_EXPECTED = json.loads((FSDP_EXAMPLES / "expected_unsupported.json").read_text())


def test_every_fsdp_example_has_an_expectation():
    assert sorted(p.name for p in FSDP_EXAMPLES.glob("*.y*ml")) == sorted(FSDP_EXPECTED)


@pytest.mark.parametrize("name", sorted(FSDP_EXPECTED))
def test_fsdp_example_shards_with_every_fsdp_key_accounted_for(name, tmp_path, monkeypatch, capsys):
    """Axolotl's QLoRA configs that shard with fsdp_config: FSDP on, each fsdp key on a row of its own and none
    of them unsupported; exit 0 unless a key outside FSDP stops it (expected_unsupported.json)."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "params.yaml"
    code = cli.main(["import-axolotl", str(FSDP_EXAMPLES / name), "-o", str(out)])
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    config = yaml.safe_load((FSDP_EXAMPLES / name).read_text())
    for key in config["fsdp_config"]:
        assert f"fsdp_config.{key}" in rows, printed
        assert "  unsupported  " not in rows[f"fsdp_config.{key}"], rows[f"fsdp_config.{key}"]
    unsupported = sorted({line.split()[0] for line in printed.splitlines() if "  unsupported  " in line})
    assert unsupported == FSDP_EXPECTED[name], printed
    params = yaml.safe_load(out.read_text())
    assert params["train"]["distributed"] == "fsdp"
    _, problems = check_params(params, repo_root=REPO)
    assert problems == []
    assert code == (2 if unsupported else 0)

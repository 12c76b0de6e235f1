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

"""Stages can read only the params keys dvc.yaml declares for them."""

from pathlib import Path

import pytest
import yaml

from reprotune.config import load_params
from reprotune.config.check import schema
from reprotune.config.declared import UndeclaredParam, declared_params, restrict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def test_declared_keys_can_be_read_others_raise(params):
    view = restrict(params, ("base.model", "tokenize"), "demo")
    assert view.base.model == "builtin:tiny-llama"
    assert view.tokenize.sequence_len == params.tokenize.sequence_len  # a parent declares its subtree
    with pytest.raises(UndeclaredParam, match="'base.revision'"):
        _ = view.base.revision
    with pytest.raises(UndeclaredParam, match="'train'"):
        _ = view.train
    with pytest.raises(AttributeError):
        view.base.model = "x"


def test_properties_stay_available(params):
    assert restrict(params, ("base.model",), "demo").base.is_builtin is True


def test_every_declared_key_exists_in_the_schema():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        for key in declared_params(stage, REPO / "dvc.yaml"):
            node = schema()
            for part in key.split("."):
                assert part in node.get("properties", {}), f"dvc.yaml stage {stage} declares unknown key {key}"
                node = node["properties"][part]

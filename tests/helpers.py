"""Helpers the tests share (imported as `helpers`: pytest puts tests/ on sys.path)."""

import dataclasses
from pathlib import Path

from reprotune.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
SHIPPED = load_params(REPO / "params.yaml")


def params_with(**sections) -> Params:
    """The shipped params with some keys changed: params_with(base={"model": "x"}), or a whole section
    given as its dataclass: params_with(tokenize=TokenizeConfig(...))."""

    def section(name: str, value):
        return value if dataclasses.is_dataclass(value) else dataclasses.replace(getattr(SHIPPED, name), **value)

    return dataclasses.replace(SHIPPED, **{name: section(name, value) for name, value in sections.items()})

"""The importer's vocabulary: what becomes of an Axolotl key (a Rule), one line of the report (a Row)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAPPED, TRANSLATED, IGNORED, UNSUPPORTED = "mapped", "translated", "ignored", "unsupported"
SPEED_ONLY = "makes a GPU run faster or leaner; the model trained is the same"
PIPELINE_DOES_IT = "the pipeline does this itself"
PER_EPOCH = "steps from the packed data size at train time"
ATTN = "train.attn_implementation"


@dataclass(frozen=True)
class Rule:
    status: str
    target: str = ""
    """The params key(s) written, as shown in the table."""
    note: str = ""
    convert: Callable[[Any, dict], dict] | None = None
    """(value, whole Axolotl config) -> {dotted params key: value}; None: a same-valued copy to `target`."""


@dataclass(frozen=True)
class Row:
    key: str
    value: Any
    status: str
    target: str
    note: str


def same(target: str, note: str = "") -> Rule:
    return Rule(MAPPED, target, note)


def ignored(note: str) -> Rule:
    return Rule(IGNORED, note=note)


def unsupported(note: str) -> Rule:
    return Rule(UNSUPPORTED, note=note)


class Unsupported(Exception):
    """A value (not the key) cannot be honoured."""

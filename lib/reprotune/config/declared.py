"""Params a stage may read: exactly the keys its dvc.yaml entry declares.

DVC reruns a stage only when a *declared* params key changes, so a stage that read an undeclared
key would silently reuse stale outputs (the Axolotl cache bug). `restrict` wraps the typed Params in
a read-only view that raises UndeclaredParam on any other key, which makes the declared lists in
dvc.yaml provably complete: every stage run, test or `dvc repro` checks them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import yaml

from reprotune.config.sections import Params


class UndeclaredParam(AttributeError):
    """A stage read a params key its dvc.yaml entry does not list."""


def declared_params(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> tuple[str, ...]:
    """The params keys listed for `stage` in dvc.yaml (params.yaml entries only)."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
    if stage not in stages:
        raise KeyError(f"stage {stage!r} is not in {dvc_yaml}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {file: [keys]} form: only params.yaml keys count here
            keys.extend(k for file, ks in entry.items() if file == "params.yaml" for k in ks)
    return tuple(keys)


def restrict(params: Params, keys: tuple[str, ...], stage: str) -> Params:
    """A view of `params` that only lets `keys` (and their sub-keys) be read. It is typed as Params:
    reading a declared key gives the section dataclasses' own types."""
    return cast(Params, _View(params, frozenset(keys), stage, ""))


class _View:
    __slots__ = ("_obj", "_keys", "_stage", "_prefix")

    def __init__(self, obj: Any, keys: frozenset[str], stage: str, prefix: str):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path = f"{self._prefix}{name}"
        value = getattr(self._obj, name)
        if name not in {f.name for f in dataclasses.fields(self._obj)}:
            return value  # a property or method, computed from keys checked on their own
        if _covered(path, self._keys):
            return value
        if any(k.startswith(path + ".") for k in self._keys):
            return _View(value, self._keys, self._stage, path + ".")
        raise UndeclaredParam(
            f"stage {self._stage!r} read params key {path!r}, which its dvc.yaml "
            "entry does not list under params: add it there, or DVC will not rerun "
            "the stage when it changes"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to params key {self._prefix}{name}")

    def __repr__(self) -> str:
        return f"<params view {self._prefix or '.'} for stage {self._stage}>"


def _covered(path: str, keys: frozenset[str]) -> bool:
    """True if `path` or one of its parents is declared (a parent declares its whole subtree)."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))

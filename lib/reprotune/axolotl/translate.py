"""Translating an Axolotl config: each key through its rule, dataset entries key by key, into params."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from reprotune.axolotl.keys import DATASET_KEYS, DATASET_TYPES, FSDP_KEYS, KEYS, PATTERNS, ZERO_IS_UNSET
from reprotune.axolotl.rules import (
    IGNORED,
    MAPPED,
    TRANSLATED,
    UNSUPPORTED,
    Row,
    Rule,
    Unsupported,
    ignored,
    unsupported,
)
from reprotune.config.check import fill_defaults, numbers_from_strings, schema


def rule_for(key: str) -> Rule:
    if key in KEYS:
        return KEYS[key]
    for pattern, rule in PATTERNS:
        if re.search(pattern, key):
            return rule
    return unsupported("not a key this importer knows: check what it does and set its reprotune equivalent")


def _empty(value) -> bool:
    return value is None or value == "" or value == [] or value == {}


def translate(cfg: dict) -> tuple[dict, list[Row]]:
    """Axolotl config -> ({dotted params key: value}, table rows in the config's key order)."""
    out: dict[str, Any] = {}
    rows: list[Row] = []
    for key, value in cfg.items():
        if _empty(value):
            if key != "adapter":  # an unset adapter gets its own row below
                rows.append(Row(key, value, IGNORED, "", "empty: unset, as Axolotl reads it"))
            continue
        if value == 0 and key in ZERO_IS_UNSET:
            rows.append(Row(key, value, IGNORED, "", "0: unset, as Axolotl reads it (`if cfg.evals_per_epoch:`)"))
            continue
        if key in ("datasets", "test_datasets"):
            if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
                rows.append(Row(key, value, UNSUPPORTED, "", "not a list of dataset mappings"))
                continue
            out[f"data.{key}"], more = _datasets(key, value)
            rows.append(Row(key, f"{len(value)} entries", MAPPED, f"data.{key}", ""))
            rows += more
            continue
        if key == "fsdp_config":
            values, more = _fsdp_config(value, cfg)
            out |= values
            rows.append(Row(key, f"{len(value)} keys", MAPPED, "train.fsdp", "train.distributed: fsdp"))
            rows += more
            continue
        rule = rule_for(key)
        if value is False and rule.status == UNSUPPORTED:  # a feature switched off is no feature
            rule = ignored("false: off, as by default")
        row = Row(key, value, rule.status, rule.target, rule.note)
        try:
            out |= _apply(key, value, rule, cfg)
        except Unsupported as e:
            row = dataclasses.replace(row, status=UNSUPPORTED, note=str(e))
        rows.append(row)
    if out.get("train.fsdp.activation_checkpointing"):  # FSDP's recomputation replaces transformers' own
        out["train.gradient_checkpointing"] = False
    if not _empty(cfg.get("test_datasets")) and _empty(cfg.get("val_set_size")):
        out["tokenize.val_set_size"] = 0  # Axolotl's default 0; reprotune's 0.05 would contradict test_datasets
        rows.append(
            Row("val_set_size", None, TRANSLATED, "tokenize.val_set_size", "0: test_datasets is the validation set")
        )
    if _empty(cfg.get("adapter")):  # Axolotl's default: every weight trained
        note = "unset: Axolotl fine-tunes every weight; reprotune trains LoRA adapters (set adapter: lora or qlora)"
        rows.append(Row("adapter", cfg.get("adapter"), UNSUPPORTED, "", note))
    return out, rows


def _apply(key: str, value, rule: Rule, cfg: dict) -> dict:
    if rule.status in (IGNORED, UNSUPPORTED):
        return {}
    if rule.convert:
        return rule.convert(value, cfg)
    return {rule.target: value} if rule.target else {}


def _datasets(group: str, entries: list) -> tuple[list[dict], list[Row]]:
    """One params entry per Axolotl dataset of `group` (datasets or test_datasets), and a row per key."""
    datasets, rows = [], []
    for i, entry in enumerate(entries):
        ds: dict[str, Any] = {}
        for key, value in entry.items():
            where = f"{group}[{i}].{key}"
            if _empty(value):
                rows.append(Row(where, value, IGNORED, "", "empty: unset, as Axolotl reads it"))
                continue
            rule = DATASET_KEYS.get(key, unsupported("not a dataset key this importer knows"))
            target = rule.target and f"data.{group}[{i}].{rule.target}"
            row = Row(where, value, rule.status, target, rule.note)
            try:
                if rule.convert:
                    ds |= rule.convert(value, entry)
                elif rule.status in (MAPPED, TRANSLATED):
                    _dataset_key(key, value, rule, ds)
            except Unsupported as e:
                row = dataclasses.replace(row, status=UNSUPPORTED, note=str(e))
            rows.append(row)
        if group == "test_datasets" and _empty(entry.get("split")):  # Axolotl reads a test set's test split
            ds["split"] = "test"
            note = "unset: test, the split Axolotl reads for a hub test set (local files have one)"
            rows.append(Row(f"{group}[{i}].split", None, TRANSLATED, f"data.{group}[{i}].split", note))
        datasets.append(ds)
    return datasets, rows


def _fsdp_config(value, cfg: dict) -> tuple[dict, list[Row]]:
    """train.distributed: fsdp and the train.fsdp keys of an fsdp_config mapping, and a row per key."""
    if not isinstance(value, dict):
        return {}, [Row("fsdp_config.", value, UNSUPPORTED, "", "not a mapping")]
    out: dict[str, Any] = {"train.distributed": "fsdp"}
    rows = []
    for key, given in value.items():
        name = key.removeprefix("fsdp_")
        rule = FSDP_KEYS.get(name, unsupported("not an fsdp_config key this importer knows"))
        row = Row(f"fsdp_config.{key}", given, rule.status, rule.target, rule.note)
        try:
            out |= _apply(name, given, rule, cfg)
        except Unsupported as e:
            row = dataclasses.replace(row, status=UNSUPPORTED, note=str(e))
        rows.append(row)
    return out, rows


def _dataset_key(key: str, value, rule: Rule, ds: dict) -> None:
    if key == "type":
        ds["type"] = DATASET_TYPES.get(value, "chat_template")
        if value not in DATASET_TYPES:
            raise Unsupported(
                f"dataset type {value!r} is not available ({', '.join(DATASET_TYPES)}); written as "
                "chat_template, the nearest for message lists: check the data's layout"
            )
    elif rule.target.startswith("message_property_mappings"):  # the mapping, or one of its older spellings
        new = dict(value) if key == rule.target else {rule.target.rpartition(".")[2]: value}
        given = ds.get("message_property_mappings", {})
        clash = sorted(k for k in new.keys() & given.keys() if new[k] != given[k])
        if clash:
            raise Unsupported(f"contradicts the other spelling for {', '.join(clash)} (Axolotl refuses it too)")
        ds["message_property_mappings"] = {**given, **new}
    else:
        ds[rule.target] = value


def params_from(cfg: dict) -> tuple[dict, list[Row]]:
    """The params (nested dict) for an Axolotl config, and the table: every key at reprotune's documented
    default (not the shipped params.yaml's tuning), then the translated values."""
    values, rows = translate(cfg)
    params = fill_defaults({}, schema())
    for dotted, value in values.items():
        *where, key = dotted.split(".")  # train.fsdp.version: a key of a nested section
        node = params
        for part in where:
            node = node[part]
        node[key] = value
    # `learning_rate: 2e-5` is a string to YAML 1.1 and a number to Axolotl: written as the number
    return numbers_from_strings(params, schema()), rows

"""Checking params.yaml: every problem at once, each with its key path, the bad value and what is allowed.

Order of work (all pure, no torch, so `reprotune check` answers in well under a second):
  0. numbers as YAML 1.1 leaves them: `2e-5` (no dot) is a string to PyYAML, a number to YAML 1.2 (DVC)
     and to Axolotl; where the schema takes a number, a string that spells one is that number;
  1. unknown keys (typos), each with the nearest valid key suggested;
  2. JSON Schema (types, ranges, allowed values) from params.schema.json;
  3. defaults filled in from the schema;
  4. cross-field rules the schema cannot say (exclusive keys, missing files, pinning).
Stages call `load_params`, which raises ParamsError (exit code 2) before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from reprotune.config.datafiles import folder_data_files, pattern_files
from reprotune.config.sections import DATA_FORMATS, Params, build_params, canonical_type
from reprotune.errors import BadInput
from reprotune.files import PROMPT_FORMATS, read_yaml_mapping

BUILTIN_PREFIX = "builtin:"
# Built-in models (built by reprotune.model.builtin) and their max positions. Kept here, not imported
# from the builder, so that checking params never depends on model code (nor reruns with it).
BUILTIN_MAX_POSITIONS = {"builtin:tiny-llama": 2048}
BUILTIN_MODELS = tuple(BUILTIN_MAX_POSITIONS)
LOCAL_MODELS_DIR = "models/local"  # the base stage's declared dependency in dvc.yaml
DATA_DIRS = ("data/raw", "data/sample")  # the validate stage's declared dependencies in dvc.yaml
PROMPTS_DIR = "data/prompts"  # the replay and evaluate stages' declared dependency in dvc.yaml
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TYPE_FIELDS = {
    "alpaca": ("field_instruction", "field_input", "field_output", "field_system"),
    "chat": (
        "field_messages",
        "message_property_mappings",
        "roles",
        "drop_system_message",
        "roles_to_train",
        "train_on_eos",
    ),
    "completion": ("field_text",),
}


FILE = "<file>"  # a Problem's path when the params file itself cannot be read


@dataclass(frozen=True)
class Problem:
    path: str
    """Key path, e.g. train.learning_rate or data.datasets[0].type."""
    message: str
    """What is wrong and what is allowed."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ParamsError(BadInput):
    """params.yaml has problems; str() lists all of them (one line when the file itself cannot be read)."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__(report(source, problems))


def report(source: str, problems: list[Problem]) -> str:
    """The problems of params file `source` as printed: a count, then one line each; a file that cannot be
    read at all is its one line (which names the file)."""
    if len(problems) == 1 and problems[0].path == FILE:
        return problems[0].message
    lines = [f"{source}: {len(problems)} problem{'s' * (len(problems) != 1)}"]
    return "\n".join(lines + [f"  {p}" for p in problems])


@cache
def schema() -> dict:
    """The params JSON Schema shipped in the package."""
    text = resources.files("reprotune.config").joinpath("params.schema.json").read_text("utf-8")
    return json.loads(text)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, check and type params.yaml. Raises ParamsError listing every problem."""
    path = Path(path)
    raw, problems = read_yaml(path)
    if not problems:
        filled, problems = check_params(raw, repo_root=path.parent)
    if problems:
        raise ParamsError(str(path), problems)
    return build_params(filled)


def read_yaml(path: Path) -> tuple[dict, list[Problem]]:
    """The YAML mapping in `path`, or one problem saying why it cannot be read (missing, empty, not UTF-8,
    not YAML, not a mapping: files.py's one-line messages)."""
    try:
        return read_yaml_mapping(path, "a params file of sections", "; `{}` takes every default"), []
    except BadInput as e:
        return {}, [Problem(FILE, str(e))]


def check_params(raw: dict, repo_root: Path = Path(".")) -> tuple[dict, list[Problem]]:
    """All problems in `raw`, and a copy with defaults filled in (meaningful only without problems).

    Cross-field rules run even when keys are bad: those keys fall back to their defaults for the
    rules, so one run reports every problem in the file.
    """
    raw = numbers_from_strings(raw, schema())
    unknown = list(unknown_keys(raw, schema(), ()))
    invalid = schema_problems(raw)
    usable = _without(raw, [where for where, _ in unknown + invalid])
    filled = fill_defaults(usable, schema())
    problems = [p for _, p in unknown] + [p for _, p in invalid]
    problems += cross_field_problems(usable, filled, repo_root)
    return filled, problems


# -- 0. numbers written as YAML 1.1 reads them ------------------------------------------------

# A number as YAML 1.2 and Python write it: 2e-5, 1E3, .5, -3, 1_000 is not one
_INTEGER = re.compile(r"[-+]?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def numbers_from_strings(value: Any, node: dict) -> Any:
    """A copy of `value` in which a string that spells a number, where the schema `node` takes a number
    (or an integer, and the string spells a whole one), is that number. Anything else is left for the
    schema to report, with its key path."""
    node = _resolve(node)
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        return {k: numbers_from_strings(v, props[k]) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and "items" in node:
        return [numbers_from_strings(item, node["items"]) for item in value]
    if isinstance(value, str):
        kinds = node.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        text = value.strip()
        if "integer" in kinds and _INTEGER.fullmatch(text):
            return int(text)
        if "number" in kinds and _NUMBER.fullmatch(text):
            return float(text)
    return value


# -- 1. unknown keys --------------------------------------------------------------------------


def unknown_keys(value: Any, node: dict, where: tuple) -> Iterator[tuple[tuple, Problem]]:
    """Keys the schema does not know, with the nearest known key as a suggestion."""
    node = _resolve(node)
    if isinstance(value, dict) and "properties" in node:
        known = list(node["properties"])
        for key, sub in value.items():
            if key not in node["properties"]:
                near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
                yield (*where, key), Problem(_dotted((*where, key)), f"unknown key{hint}")
            else:
                yield from unknown_keys(sub, node["properties"][key], (*where, key))
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            yield from unknown_keys(item, node["items"], (*where, i))


# -- 2. schema --------------------------------------------------------------------------------


def schema_problems(raw: dict) -> list[tuple[tuple, Problem]]:
    """Type, range and enum problems; unknown keys are left to `unknown_keys`."""
    validator = jsonschema.Draft202012Validator(schema())
    found = []
    for error in validator.iter_errors(raw):
        if error.validator == "additionalProperties":
            continue
        where = tuple(error.absolute_path)
        if error.validator == "required":
            missing = re.match(r"'([^']+)'", error.message)
            where = (*where, missing.group(1) if missing else "?")
        found.append((where, Problem(_dotted(where) or "<top>", _error_message(error))))
    return sorted(found, key=lambda item: item[1].path)


def _error_message(error: jsonschema.ValidationError) -> str:
    got = f"got {_show(error.instance)}"
    v, expected = error.validator, error.validator_value
    if v == "type":
        kinds = expected if isinstance(expected, list) else [expected]
        return f"{got}; expected {' or '.join(_TYPE_NAMES.get(k, k) for k in kinds)}"
    if v == "enum":
        return f"{got}; allowed: {', '.join(_show(x) for x in expected)}"
    if v in _BOUNDS:
        return f"{got}; must be {_BOUNDS[v]} {expected}"
    if v == "required":
        return "required key is missing"
    if v == "minLength":
        return "must not be empty"
    if v == "minItems":
        return f"{got}; needs at least {expected} item{'s' * (expected != 1)}"
    if v == "uniqueItems":
        return f"{got}; items must not repeat"
    if v == "pattern":
        return f"{got}; expected a size such as 500MB or 2GB"
    return error.message


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


# -- 3. defaults ------------------------------------------------------------------------------


def fill_defaults(value: Any, node: dict) -> Any:
    """A copy of `value` with every missing key set to its schema default (recursively)."""
    node = _resolve(node)
    if isinstance(value, dict) and "properties" in node:
        out = {}
        for key, sub in node["properties"].items():
            if key in value:
                out[key] = fill_defaults(value[key], sub)
            elif "default" in sub:
                out[key] = fill_defaults(json.loads(json.dumps(sub["default"])), sub)
        return out
    if isinstance(value, list) and "items" in node:
        return [fill_defaults(item, node["items"]) for item in value]
    return value


# -- 4. cross-field rules ---------------------------------------------------------------------


def cross_field_problems(raw: dict, p: dict, root: Path) -> Iterator[Problem]:
    """Rules that involve more than one key, or the file system."""
    yield from _base_problems(p["base"], root)
    tok, train, lora = p["tokenize"], p["train"], p["lora"]
    for group in ("datasets", "test_datasets"):
        raw_datasets = (raw.get("data") or {}).get(group) or []  # as written: to spot misplaced keys
        for i, ds in enumerate(p["data"][group]):
            if not isinstance(ds, dict):
                continue  # already reported by the schema
            given = raw_datasets[i] if i < len(raw_datasets) else {}
            yield from _dataset_problems(given, ds, f"data.{group}[{i}]", root)
            if group == "test_datasets" and ds.get("weight", 1) != 1:
                yield Problem(f"data.test_datasets[{i}].weight", "a validation set is not weighted; remove it")
    if p["data"]["test_datasets"] and tok["val_set_size"] != 0:
        yield Problem(
            "tokenize.val_set_size",
            f"got {_show(tok['val_set_size'])}; data.test_datasets is the validation set: set val_set_size to 0",
        )
    if tok["val_set_size"] >= 1 and tok["val_set_size"] != int(tok["val_set_size"]):
        yield Problem(
            "tokenize.val_set_size",
            f"got {_show(tok['val_set_size'])}; a fraction must be below 1, a count must be a whole number",
        )
    max_positions = BUILTIN_MAX_POSITIONS.get(p["base"]["model"])
    if max_positions and tok["sequence_len"] > max_positions:
        yield Problem(
            "tokenize.sequence_len",
            f"got {tok['sequence_len']}; the built-in model takes at most {max_positions} positions",
        )
    base = p["base"]
    if (base["chat_template"] == "jinja") != (base["chat_template_jinja"] is not None):
        yield Problem("base.chat_template_jinja", "set it exactly when base.chat_template is jinja")
    if train["warmup_ratio"] is not None and train["warmup_steps"] is not None:
        yield Problem("train.warmup_steps", "set warmup_steps or warmup_ratio, not both")
    for steps, per_epoch in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
        if (train[steps] is None) == (train[per_epoch] is None):
            yield Problem(
                f"train.{per_epoch}", f"set exactly one of train.{steps} and train.{per_epoch}, the other null"
            )
    if train["cosine_min_lr_ratio"] is not None and train["lr_scheduler"] != "cosine":
        yield Problem(
            "train.cosine_min_lr_ratio", f"applies to lr_scheduler cosine only; lr_scheduler is {train['lr_scheduler']}"
        )
    yield from _early_stopping_problems(train, tok, p["data"])
    if p["data"]["replay"]["source"] == "prompts":
        yield from _prompt_file_problems(p["data"]["replay"]["prompts"], "data.replay.prompts", root)
    if p["evaluate"]["general_prompts"] is not None:
        yield from _prompt_file_problems(p["evaluate"]["general_prompts"], "evaluate.general_prompts", root)
    yield from _tracker_problems(train)
    yield from _distributed_problems(train, p["quant"])
    if train["bf16"] is True and train["fp16"]:
        yield Problem("train.fp16", "bf16: true and fp16: true are exclusive; choose one")
    if lora["target_linear"] and lora["target_modules"] is not None:
        yield Problem("lora.target_modules", "set target_modules or target_linear: true, not both")
    if not lora["target_linear"] and lora["target_modules"] is None:
        yield Problem("lora.target_modules", "nothing to adapt: set target_linear: true or list target_modules")
    if "safetensors" not in p["export"]["formats"]:
        yield Problem(
            "export.formats",
            f"got {_show(p['export']['formats'])}; safetensors is always "
            "exported, list it (gguf is the optional extra)",
        )


def _early_stopping_problems(train: dict, tok: dict, data: dict) -> Iterator[Problem]:
    """Early stopping watches the validation loss: it needs a validation split."""
    if train["early_stopping_patience"] is not None and tok["val_set_size"] == 0 and not data["test_datasets"]:
        yield Problem(
            "train.early_stopping_patience",
            "needs a validation split: set tokenize.val_set_size above 0 or data.test_datasets",
        )


def _prompt_file_problems(path: str, key: str, root: Path) -> Iterator[Problem]:
    """A prompt file exists under data/prompts/ (the stages' declared dependency: edits rerun them)."""
    local = root / path
    if not _is_under(local, root / PROMPTS_DIR):
        yield Problem(key, f"got {_show(path)}; a prompt file must lie under {PROMPTS_DIR}/ (declared in dvc.yaml)")
    elif not local.is_file():
        yield Problem(key, f"got {_show(path)}; file does not exist")
    elif local.suffix not in PROMPT_FORMATS:
        yield Problem(key, f"got {_show(path)}; a prompt file is {' or '.join(PROMPT_FORMATS)}")


def _distributed_problems(train: dict, quant: dict) -> Iterator[Problem]:
    """FSDP settings that contradict the rest, and a machine rank outside the machines."""
    fsdp = train["fsdp"]
    if train["distributed"] != "fsdp":
        for name in ("offload_params", "activation_checkpointing"):
            if fsdp[name]:
                yield Problem(f"train.fsdp.{name}", "applies under FSDP only: set train.distributed: fsdp, or false")
    elif fsdp["activation_checkpointing"] and train["gradient_checkpointing"]:
        yield Problem(
            "train.fsdp.activation_checkpointing",
            "train.gradient_checkpointing is true as well: the same recomputation twice; set one of them false",
        )
    if train["distributed"] == "fsdp" and quant["load_in_4bit"] and quant["bnb_4bit_quant_storage"] == "uint8":
        yield Problem(
            "quant.bnb_4bit_quant_storage",
            "got uint8; sharded 4-bit weights must be stored in the compute dtype: auto (which is) or the "
            "dtype of quant.bnb_4bit_compute_dtype",
        )
    if train["machine_rank"] is not None and train["machine_rank"] >= train["num_machines"]:
        yield Problem(
            "train.machine_rank",
            f"got {train['machine_rank']}; ranks run from 0 to train.num_machines - 1 = {train['num_machines'] - 1}",
        )


def _tracker_problems(train: dict) -> Iterator[Problem]:
    """dvclive writes the curves dvc.yaml declares; a tracker's names only mean something with its tracker."""
    if "dvclive" not in train["report_to"]:
        yield Problem(
            "train.report_to",
            f"got {_show(train['report_to'])}; dvclive writes the train stage's dvclive/ curves that dvc.yaml "
            "declares: keep it in the list beside wandb, mlflow or tensorboard",
        )
    for name in train:
        tracker = name.split("_")[0]
        if tracker in ("wandb", "mlflow") and train[name] is not None and tracker not in train["report_to"]:
            yield Problem(f"train.{name}", f"set, but {tracker} is not in train.report_to: add it, or unset {name}")
    names = {train["wandb_name"], train["mlflow_run_name"]} - {None}
    if len(names) > 1:  # the Trainer has one run_name for every tracker
        yield Problem("train.mlflow_run_name", "differs from train.wandb_name: the Trainer names both runs alike")


def _base_problems(base: dict, root: Path) -> Iterator[Problem]:
    model, revision = base["model"], base["revision"]
    if model.startswith(BUILTIN_PREFIX):
        if model not in BUILTIN_MODELS:
            yield Problem("base.model", f"got {_show(model)}; built-in models: {', '.join(BUILTIN_MODELS)}")
        if revision is not None:
            yield Problem("base.revision", "applies to hub ids only; remove it for a built-in model")
    elif model.endswith(".gguf") and not (root / model).is_file():
        yield Problem(
            "base.model",
            f"GGUF file {_show(model)} not found; place it under {LOCAL_MODELS_DIR}/ "
            "(`make real-model` fetches SmolLM2-135M-Instruct's)",
        )
    elif (root / model).exists():
        if not _is_under(root / model, root / LOCAL_MODELS_DIR):
            yield Problem(
                "base.model",
                f"local models (folders, .gguf files) must lie under {LOCAL_MODELS_DIR}/ "
                "(the base stage's declared dependency, so edits rerun it)",
            )
        if revision is not None:
            yield Problem("base.revision", "applies to hub ids only; remove it for a local folder")
    elif HUB_ID.match(model):
        if revision is None:
            yield Problem(
                "base.revision",
                f"hub id {_show(model)} must be pinned: set a branch, tag or "
                "commit (it is resolved to a commit sha); or, for a local folder: it does not exist",
            )
    else:
        yield Problem(
            "base.model",
            f"got {_show(model)}; not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "an existing local folder, or a hub id org/name",
        )


def _dataset_problems(raw: dict, ds: dict, path: str, root: Path) -> Iterator[Problem]:
    for field, types in ((f, t) for t, fs in _TYPE_FIELDS.items() for f in fs):
        if field in raw and canonical_type(ds.get("type", types)) != types:
            yield Problem(f"{path}.{field}", f"applies to type {types} only; this dataset is {ds['type']}")
    if ds.get("shards") is None and ds.get("shards_idx", 0) != 0:
        yield Problem(f"{path}.shards_idx", "applies only with shards set")
    elif ds.get("shards") is not None and ds.get("shards_idx", 0) >= ds["shards"]:
        yield Problem(f"{path}.shards_idx", f"got {ds['shards_idx']}; must be below shards ({ds['shards']})")
    if "path" not in ds:
        return  # already reported by the schema
    yield from _source_problems(ds, path, root)


def _source_problems(ds: dict, path: str, root: Path) -> Iterator[Problem]:
    """A dataset's path is a data file, a folder of them (data_files), or a hub id (name, data_files)."""
    source = ds["path"]
    local = root / source
    if not local.exists():
        if local.suffix.lower() in DATA_FORMATS or not HUB_ID.match(source):
            yield Problem(f"{path}.path", f"got {_show(source)}; file does not exist")
        elif ds.get("ds_type") is not None:
            yield Problem(f"{path}.ds_type", "applies to local files only; the hub dataset says its own format")
        return
    if not any(_is_under(local, root / d) for d in DATA_DIRS):
        yield Problem(
            f"{path}.path",
            f"got {_show(source)}; local data must lie under "
            f"{' or '.join(d + '/' for d in DATA_DIRS)} (the validate stage's declared "
            "dependencies, so edits rerun it)",
        )
    if ds.get("name") is not None:
        yield Problem(f"{path}.name", "applies to hub datasets only; this path is local")
    if local.is_dir():
        yield from _folder_problems(local, ds.get("data_files"), path, root)
        return
    if ds.get("data_files") is not None:
        yield Problem(f"{path}.data_files", "applies to a folder or a hub dataset; this path is a file")
    if ds.get("ds_type") is None and local.suffix.lower() not in DATA_FORMATS:
        yield Problem(
            f"{path}.path",
            f"got {_show(source)}; unknown file type, allowed: {', '.join(DATA_FORMATS)} (or set ds_type)",
        )


def _folder_problems(folder: Path, patterns: list | None, path: str, root: Path) -> Iterator[Problem]:
    """A dataset folder must hold data files; each data_files pattern must match some, inside the folder."""
    if patterns is None:
        if not folder_data_files(folder):
            yield Problem(f"{path}.path", f"folder holds no data file ({', '.join(DATA_FORMATS)})")
        return
    for j, pattern in enumerate(patterns):
        where = f"{path}.data_files[{j}]"
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            yield Problem(where, f"got {_show(pattern)}; a name or glob inside the folder (no absolute path, no ..)")
            continue
        try:
            matches = pattern_files(folder, pattern)
        except (ValueError, NotImplementedError) as e:
            yield Problem(where, f"got {_show(pattern)}; not a valid glob pattern ({e})")
            continue
        if not matches:
            yield Problem(where, f"got {_show(pattern)}; matches no file in {folder.relative_to(root).as_posix()}")


# -- helpers ----------------------------------------------------------------------------------


def _resolve(node: dict) -> dict:
    ref = node.get("$ref")
    return schema()["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def _dotted(where: tuple) -> str:
    """('data', 'datasets', 0, 'type') -> data.datasets[0].type"""
    path = ""
    for part in where:
        path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
    return path


def _without(raw: dict, bad: list[tuple]) -> dict:
    """A deep copy of `raw` without the values at the `bad` paths (so defaults stand in for them)."""
    clean = json.loads(json.dumps(raw, default=str))
    for where in sorted((w for w in bad if w), key=len, reverse=True):
        node = clean
        for part in where[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            if isinstance(node, dict):
                node.pop(where[-1], None)
            elif isinstance(node, list) and isinstance(where[-1], int) and where[-1] < len(node):
                node[where[-1]] = None  # keep list positions so later indexes stay right
    return clean


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _is_under(path: Path, parent: Path) -> bool:
    return path.resolve().is_relative_to(parent.resolve())

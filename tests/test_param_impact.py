"""The param-impact test: changing one thing makes DVC rerun exactly the stages that depend on it.

The map of what each stage depends on is dvc.yaml itself (its params lists and deps). Two other tests
keep that map honest against the code: test_declared (a stage cannot read an undeclared params key)
and test_dvc_deps (a stage's code deps equal the code it imports). Here, in a temporary copy of the
repo with every stage recorded as up to date, each params leaf, data file and library file is changed
in turn, and `dvc status` must report exactly the stages the map names: no more, no fewer.
"""

import contextlib
import copy
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from dvc.repo import Repo

from reprotune.config.check import schema

STAGE_OUTPUT_KINDS = ("outs", "metrics", "plots")
# Files no stage runs or reads: tools for people, tests and benchmarks, not pipeline inputs.
OUTSIDE_PIPELINE = {
    "lib/reprotune/cli.py",
    "lib/reprotune/testing.py",
    "lib/reprotune/schema.py",
    "lib/reprotune/real_model.py",
    "lib/reprotune/chat.py",
    "lib/reprotune/axolotl/__init__.py",
    "lib/reprotune/axolotl/__main__.py",
    "lib/reprotune/axolotl/keys.py",
    "lib/reprotune/axolotl/output.py",
    "lib/reprotune/axolotl/rules.py",
    "lib/reprotune/axolotl/translate.py",
    "lib/reprotune/axolotl/values.py",
    "data/make_sample.py",
    "data/README.md",
    "data/raw/README.md",
    "models/local/README.md",
}


def stages_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def output_paths(stage: dict) -> list[str]:
    paths = []
    for kind in STAGE_OUTPUT_KINDS:
        for entry in stage.get(kind, []):
            paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def record_all_stages_as_run(repo: Path) -> None:
    """Stand-in outputs for every stage, then `dvc commit`: the lock says all is up to date."""
    stages = stages_of(repo).values()
    made = [out for stage in stages for out in output_paths(stage)]
    made += [dep for stage in stages for dep in stage["deps"] if not (repo / dep).exists()]  # files inside outputs
    for name in made:
        path = repo / name
        if Path(name).suffix:  # a file (metrics json, records.parquet)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "stand-in").write_text("x\n")
    with contextlib.chdir(repo):  # DVC resolves stage paths from the working directory
        dvc = Repo(".")
        dvc.commit(force=True)
        assert dvc.status() == {}, dvc.status()


def changed_stages(repo: Path) -> set[str]:
    with contextlib.chdir(repo):
        return set(Repo(".").status())


def leaves(value, path=()):
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from leaves(sub, (*path, key))
    else:
        yield path, value  # lists are leaves: DVC compares a list value whole


def node_for(path: tuple) -> dict:
    node = schema()
    for part in path:
        node = node["properties"][part]
    return node


def another_valid_value(value, node: dict):
    """A different value the schema accepts for this key."""
    kinds = node.get("type", [])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "enum" in node:
        return next(v for v in node["enum"] if v != value)
    if isinstance(value, bool):
        return not value
    if value is None:
        return {"string": "v1", "integer": 1, "number": 0.5, "array": ["q_proj"]}[next(k for k in kinds if k != "null")]
    if isinstance(value, int) and not isinstance(value, bool):
        return value - 1 if value + 1 > node.get("maximum", value + 1) else value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    if isinstance(value, str):
        if "integer" in kinds:  # "auto" of an auto-or-a-number key: a number
            return node.get("minimum", 0) + 1
        return value.replace("GB", "MB") if node.get("pattern") else value + "-v2"
    if isinstance(value, list):
        if len(value) > 1:
            return value[:-1]
        items = node.get("items", {})
        if "$ref" in items:  # a list of datasets
            return value + [{"path": "data/sample/alpaca.jsonl", "type": "alpaca"}]
        return value + [next((v for v in items.get("enum", []) if v not in value), "v1")]
    if isinstance(value, dict):  # an empty mapping: give its first allowed key a value
        return {next(iter(node["properties"])): "v1"}
    raise AssertionError(f"no rule to change {value!r}")


def expected_for(paths: list[str], stages: dict, key: str | None = None) -> set[str]:
    """Stages that declare `key` (or a parent of it), or a dep covering any of `paths`."""
    hit = set()
    for name, stage in stages.items():
        params = [p for p in stage.get("params", []) if isinstance(p, str)]
        if key and any(key == p or key.startswith(p + ".") for p in params):
            hit.add(name)
        for dep in stage.get("deps", []):
            if any(path == dep or path.startswith(dep.rstrip("/") + "/") for path in paths):
                hit.add(name)
    return hit


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from conftest import copy_repo

    repo = copy_repo(tmp_path_factory.mktemp("impact"))
    record_all_stages_as_run(repo)
    return repo


def test_every_params_leaf_reruns_exactly_its_stages(pipeline):
    params_file = pipeline / "params.yaml"
    original_text = params_file.read_text()
    original = yaml.safe_load(original_text)
    stages = stages_of(pipeline)
    checked, fixed = set(), set()
    for path, value in leaves(original):
        key = ".".join(path)
        if len(node_for(path).get("enum", [None, None])) == 1:  # one allowed value: nothing to change it to
            fixed.add(key)
            continue
        changed = copy.deepcopy(original)
        target = changed
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = another_valid_value(value, node_for(path))
        jsonschema.validate(changed, schema())  # the new value is one a user could set
        params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
        try:
            assert changed_stages(pipeline) == expected_for([], stages, key), key
        finally:
            params_file.write_text(original_text)
        checked.add(key)
    assert checked | fixed == schema_leaves(schema())  # params.yaml spells out every key, and each was changed
    assert fixed == {"train.fsdp.version", "train.fsdp.auto_wrap_policy"}  # those there is no other value for


def schema_leaves(node: dict, prefix: str = "") -> set[str]:
    """Every key path of the schema: a mapping with keys of its own by default (data.replay) is descended into,
    an open one (base.special_tokens, default {}) is a leaf."""
    out = set()
    for key, child in node["properties"].items():
        path = f"{prefix}{key}"
        nested = "properties" in child and (not prefix or child.get("default"))
        out |= schema_leaves(child, path + ".") if nested else {path}
    return out


def test_every_data_and_code_file_reruns_exactly_its_stages(pipeline):
    stages = stages_of(pipeline)
    tracked = subprocess.run(
        ["git", "ls-files", "lib", "stages", "data"], cwd=pipeline, check=True, capture_output=True, text=True
    ).stdout.split()
    files = [pipeline / name for name in tracked]
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(pipeline).as_posix()
        before = path.read_bytes()
        path.write_bytes(before + b"\n")
        try:
            expected = set() if rel in OUTSIDE_PIPELINE else expected_for([rel], stages)
            assert changed_stages(pipeline) == expected, rel
            assert expected or rel in OUTSIDE_PIPELINE, f"{rel} is a dep of no stage"
        finally:
            path.write_bytes(before)

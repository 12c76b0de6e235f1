"""Every door a user opens with a file, walked with each kind of bad file: missing, empty, unreadable bytes
(not UTF-8), wrong syntax, wrong top-level type, truncated, and the wrong format under the right name.
Each row must end with exit 2, no traceback, nothing written, and a message that names the file.

Doors: `reprotune check`, `reprotune import-axolotl`, the base stage (a GGUF file; a local folder's
config.json and safetensors weights) and validate (each dataset format, and a data_files folder).
`pytest tests/test_bad_files.py -s` prints the table (door x bad file -> message).
The stage doors run in this process through the stage scripts themselves (runpy: the same run_stage doorway,
so an unexpected exception fails the test as it would print a traceback); the five cases the issue that
asked for this reported run as real processes in test_the_reported_cases_exit_2_without_a_traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO

from reprotune import cli
from reprotune.export.gguf import write_gguf

BIN = Path(sys.executable).parent
# an Axolotl config with a flow list, so that a copy cut inside it is no valid YAML (cut elsewhere, the rest
# of a YAML file is a config of its own: no reader can tell it was cut)
AXOLOTL_CONFIG = (
    (REPO / "tests/fixtures/axolotl/lora_alpaca.yml")
    .read_text()
    .replace("lora_target_modules:\n  - q_proj\n  - v_proj\n", "lora_target_modules: [q_proj, v_proj]\n")
)
ALPACA_LINE = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})


@dataclass(frozen=True)
class Door:
    name: str
    file: str
    """The bad file's path in the project."""
    good: Callable[[Path], bytes]
    """The file as it should be (given the project, for files built from the built-in model)."""
    bad: dict[str, Callable[[bytes], bytes | None]]
    """Kind of bad file -> its bytes from the good ones (None: the file is not there)."""
    run: Callable[[Path], int]
    """Open the door in the project; the exit code."""
    params: dict | None = None
    """params.yaml changes the door needs (section -> keys)."""


# ------------------------------------------------------------------ how each door is opened


def cli_door(*args: str) -> Callable[[Path], int]:
    return lambda root: cli.main([a.format(root=root) for a in args])


def stage_door(stage: str) -> Callable[[Path], int]:
    def run(root: Path) -> int:
        try:
            runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        return 0

    return run


# ------------------------------------------------------------------ good files and their bad kinds


def text(value: str) -> Callable[[Path], bytes]:
    return lambda root: value.encode()


def params_text(root: Path) -> bytes:
    return (REPO / "params.yaml").read_bytes()


def cut_inside_first(marker: bytes) -> Callable[[bytes], bytes]:
    """The file cut just after `marker` (an opening quote or bracket): a file whose copy stopped there."""
    return lambda good: good[: good.index(marker) + len(marker)]


def half(good: bytes) -> bytes:
    return good[: len(good) // 2]


NOT_UTF8 = b"\xff\xfe\xfa"  # no UTF-8 text starts like this (nor any BOM)


def yaml_kinds(truncated_after: bytes, other_format: bytes) -> dict:
    return {
        "missing": lambda good: None,
        "empty": lambda good: b"",
        "not UTF-8": lambda good: NOT_UTF8 + good,
        "wrong syntax": lambda good: b"base:\n  model: [builtin:tiny-llama\n",
        "wrong top-level type": lambda good: b"- one\n- two\n",
        "truncated": cut_inside_first(truncated_after),
        "wrong format": lambda good: other_format,
    }


def gguf_file(root: Path) -> bytes:
    from reprotune.model.builtin import build_tiny_llama

    model = root / "tiny"
    if not model.exists():
        build_tiny_llama(model)
    write_gguf(model, root / "tiny.gguf", "f32", "tiny")
    return (root / "tiny.gguf").read_bytes()


def safetensors_file(root: Path) -> bytes:
    from reprotune.model.builtin import build_tiny_llama

    build_tiny_llama(root / "models/local/m")
    return (root / "models/local/m/model.safetensors").read_bytes()


def config_json(root: Path) -> bytes:
    safetensors_file(root)
    return (root / "models/local/m/config.json").read_bytes()


def alpaca_table():
    return pa.table({"instruction": ["Say hi."] * 50, "input": [""] * 50, "output": ["hi"] * 50})


def parquet_bytes(root: Path) -> bytes:
    sink = io.BytesIO()
    pq.write_table(alpaca_table(), sink)
    return sink.getvalue()


def arrow_bytes(root: Path) -> bytes:
    sink = io.BytesIO()
    table = alpaca_table()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def json_kinds(opening: bytes, wrong_type: bytes) -> dict:
    """A JSON file's bad kinds: `opening` is its first bracket (a comma after it breaks the syntax)."""
    return {
        "empty": lambda good: b"",
        "not UTF-8": lambda good: NOT_UTF8 + good,
        "wrong syntax": lambda good: good.replace(opening, opening + b",", 1),
        "wrong top-level type": lambda good: wrong_type,
        "truncated": half,
    }


def dataset(path: str, kind: str = "alpaca", **keys) -> dict:
    return {"data": {"datasets": [{"path": path, "type": kind, **keys}]}, "tokenize": {"val_set_size": 0.1}}


JSONL = "\n".join([ALPACA_LINE] * 50) + "\n"
DOORS = [
    Door(
        "reprotune check",
        "params.yaml",
        params_text,
        yaml_kinds(b'prompts: ["', AXOLOTL_CONFIG.encode()),
        cli_door("check", "{root}/params.yaml"),
    ),
    Door(
        "reprotune import-axolotl",
        "axolotl.yml",
        text(AXOLOTL_CONFIG),
        yaml_kinds(b"lora_target_modules: [", (REPO / "params.yaml").read_bytes()),
        cli_door("import-axolotl", "{root}/axolotl.yml", "-o", "{root}/out.yaml"),
    ),
    Door(
        "base: GGUF file",
        "models/local/m.gguf",
        gguf_file,
        {
            "missing": lambda good: None,
            "empty": lambda good: b"",
            "truncated (inside its header)": lambda good: good[:1000],
            "truncated (1 MB of it)": lambda good: good[: 1 << 20],
            "truncated (half)": half,
            "wrong format (safetensors)": lambda good: (REPO / "tests/fixtures/tokenize/builtin.json").read_bytes(),
        },
        stage_door("base"),
        {"base": {"model": "models/local/m.gguf"}},
    ),
    Door(
        "base: folder's config.json",
        "models/local/m/config.json",
        config_json,
        json_kinds(b"{", b"[1, 2]"),
        stage_door("base"),
        {"base": {"model": "models/local/m"}},
    ),
    Door(
        "base: folder's model.safetensors",
        "models/local/m/model.safetensors",
        safetensors_file,
        {
            "missing": lambda good: None,
            "empty": lambda good: b"",
            "truncated": half,
            "wrong format (text)": lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n",
        },
        stage_door("base"),
        {"base": {"model": "models/local/m"}},
    ),
    Door(
        "validate: alpaca .jsonl",
        "data/raw/d.jsonl",
        text(JSONL),
        {
            "missing": lambda good: None,
            "empty": lambda good: b"",
            "not UTF-8": lambda good: b"\n".join(NOT_UTF8 + line for line in good.splitlines()),
            "wrong syntax": lambda good: good.replace(b"{", b"{,"),
            "wrong top-level type": lambda good: b"\n".join(b"[1, 2]" for _ in range(50)),
            "truncated": lambda good: good[: len(ALPACA_LINE) // 2],
            "wrong format (Parquet)": lambda good: parquet_bytes(Path()),
        },
        stage_door("validate"),
        dataset("data/raw/d.jsonl"),
    ),
    Door(
        "validate: chat .json",
        "data/raw/d.json",
        text(json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])),
        json_kinds(b"[", b'{"messages": []}'),
        stage_door("validate"),
        dataset("data/raw/d.json", "chat_template"),
    ),
    Door(
        "validate: completion .txt",
        "data/raw/d.txt",
        text("Some text to continue.\n" * 50),
        {"empty": lambda good: b"", "not UTF-8": lambda good: NOT_UTF8 * 40},
        stage_door("validate"),
        dataset("data/raw/d.txt", "completion"),
    ),
    Door(
        "validate: .parquet",
        "data/raw/d.parquet",
        parquet_bytes,
        {"empty": lambda good: b"", "truncated": half, "wrong format (JSON Lines)": lambda good: JSONL.encode()},
        stage_door("validate"),
        dataset("data/raw/d.parquet"),
    ),
    Door(
        "validate: .csv",
        "data/raw/d.csv",
        text("instruction,input,output\n" + "Say hi.,,hi\n" * 50),
        {"empty": lambda good: b"", "not UTF-8": lambda good: NOT_UTF8 + good},
        stage_door("validate"),
        dataset("data/raw/d.csv"),
    ),
    Door(
        "validate: .arrow",
        "data/raw/d.arrow",
        arrow_bytes,
        {"empty": lambda good: b"", "truncated": half, "wrong format (JSON Lines)": lambda good: JSONL.encode()},
        stage_door("validate"),
        dataset("data/raw/d.arrow"),
    ),
    Door(
        "validate: data_files folder",
        "data/raw/folder/part-0.jsonl",
        text(JSONL),
        {"missing": lambda good: None, "not UTF-8": lambda good: b"\n".join(NOT_UTF8 + x for x in good.splitlines())},
        stage_door("validate"),
        dataset("data/raw/folder", data_files=["part-*.jsonl"]),
    ),
]
ROWS = [(door, kind) for door in DOORS for kind in door.bad]


# ------------------------------------------------------------------ the walk


def project(root: Path, door: Door) -> Path:
    """A project folder with the door's params, its good file replaced by the bad one later."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "data/sample", root / "data/sample")
    shutil.copytree(REPO / "data/prompts", root / "data/prompts")  # evaluate.general_prompts
    (root / "data/raw").mkdir(parents=True)
    (root / "models/local").mkdir(parents=True)
    if door.params:
        params = yaml.safe_load((root / "params.yaml").read_text())
        for section, values in door.params.items():
            params[section].update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def open_door(door: Door, kind: str, root: Path, good: bytes, monkeypatch) -> tuple[int, str]:
    target = root / door.file
    bad = door.bad[kind](good)
    target.unlink(missing_ok=True)
    if bad is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bad)
    monkeypatch.chdir(root)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = door.run(root)
        except Exception as e:  # what a user would see as a traceback
            return 1, f"Traceback: {type(e).__name__}: {e}"
    return code, stderr.getvalue().strip()


def outputs(root: Path) -> list[str]:
    """What the stages would have written (none may exist after a refusal)."""
    made = ["models/base", "data/validated", "metrics", "out.yaml"]
    return [name for name in made if (root / name).exists()]


def test_every_door_refuses_every_bad_file_with_one_clear_line(tmp_path, monkeypatch):
    table, failures = [], []
    (tmp_path / "gguf").mkdir()
    tiny_gguf = gguf_file(tmp_path / "gguf")  # built once: the GGUF door's good file
    for i, (door, kind) in enumerate(ROWS):
        root = project(tmp_path / f"row{i}", door)
        good = tiny_gguf if door.good is gguf_file else door.good(root)  # a model folder's files are built in it
        code, message = open_door(door, kind, root, good, monkeypatch)
        lines = message.splitlines()
        # a missing file inside a folder: the folder is named (as holding no such file)
        names = [door.file, Path(door.file).name] + ([str(Path(door.file).parent)] if kind == "missing" else [])
        naming = [line.strip() for line in lines if any(name in line for name in names)]
        shown = naming[-1] if naming else lines[-1] if lines else "(nothing)"
        table.append(f"{door.name:<34} {kind:<26} {code}  {shown.replace(str(root) + '/', '')}")
        named = bool(naming)
        if code != 2 or "Traceback" in message or not named or outputs(root):
            failures.append(table[-1] + f"   [written: {outputs(root)}]")
    print("\n" + "\n".join(table))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kind", ["truncated (1 MB of it)", "wrong format (safetensors)"])
def test_a_bad_gguf_base_exits_2_without_a_traceback(tmp_path, tiny_model_dir, kind):
    """The base stage as `dvc repro` runs it, a real process, on a GGUF cut short or not a GGUF at all."""
    door = next(d for d in DOORS if d.name == "base: GGUF file")
    root = project(tmp_path / "p", door)
    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f32", "tiny")
    (root / door.file).write_bytes(door.bad[kind]((tmp_path / "tiny.gguf").read_bytes()))
    result = subprocess.run([sys.executable, str(REPO / "stages/base.py")], cwd=root, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"base: {door.file}: ")
    assert not (root / "models/base").exists()


@pytest.mark.parametrize(
    "args, file, content",
    [
        (["import-axolotl", "{f}"], "bad.yml", b"a: [1,\n"),
        (["import-axolotl", "{f}"], "none.yml", None),
        (["import-axolotl", "{f}"], "empty.yml", b""),
    ],
)
def test_the_reported_cases_exit_2_without_a_traceback(tmp_path, args, file, content):
    """As a user runs them: the reprotune command, a real process."""
    path = tmp_path / file
    if content is not None:
        path.write_bytes(content)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    command = [str(BIN / "reprotune"), *(a.format(f=path) for a in args), "-o", str(tmp_path / "out.yaml")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(path) in result.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_a_model_folder_missing_a_shard_its_index_names(tmp_path):
    """A half-copied sharded folder: the index names two shards, one is there."""
    import torch
    from safetensors.torch import save_file

    from reprotune.errors import BadInput
    from reprotune.files import check_model_folder

    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    names = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BadInput, match=r"model.safetensors.index.json: names shard\(s\) the folder lacks: model-00002"):
        check_model_folder(tmp_path, names)

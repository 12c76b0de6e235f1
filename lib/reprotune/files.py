"""The files a user hands in, read or checked so that a bad one is one line naming it and what is wrong.

Every door that opens a user's file goes through here: `reprotune check` (params files), `reprotune
import-axolotl` (Axolotl configs), prompt files (evaluate.general_prompts, data.replay.prompts), the base
stage (a local model folder's JSON and safetensors files, a GGUF file: gguf_base.py checks its header with
`check_size`). A problem raises BadInput (exit 2) whose text
starts with the file's path: missing, a folder, empty, not UTF-8 (with the byte), not valid YAML or JSON
(with line and column), the wrong top-level type, or cut short (its size against the size its header
declares). Nothing is written before these checks pass.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import yaml

from reprotune.errors import BadInput

SAFETENSORS_HEADER_MAX = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM dropped)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: does not exist")
    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x})") from None


def read_yaml_mapping(path: Path, what: str, if_empty: str = "") -> dict:
    """The YAML mapping in `path`; `what` names what it should be in the messages ("an Axolotl config"),
    `if_empty` is added to the message for an empty file."""
    return _mapping(path, f"{what} (a YAML mapping)", if_empty, yaml.safe_load)


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (a model folder's config.json, tokenizer.json, ...)."""
    return _mapping(path, "a JSON object", "", json.loads)


def _mapping(path: Path, expected: str, if_empty: str, parse) -> dict:
    text = read_text(path)
    if not text.strip():
        raise BadInput(f"{path}: is empty; expected {expected}{if_empty}")
    try:
        value = parse(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: {_syntax_error(e)}") from None
    except (ValueError, RecursionError) as e:  # a value YAML cannot build (`2024-02-30`), nesting too deep
        raise BadInput(f"{path}: not readable ({type(e).__name__}: {e})") from None
    if value is None:  # comments only
        raise BadInput(f"{path}: is empty; expected {expected}{if_empty}")
    if not isinstance(value, dict):
        raise BadInput(f"{path}: expected {expected}, this file holds {kind_of(value)}")
    return value


PROMPT_FORMATS = (".jsonl", ".txt")


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number from 1, prompt) of each prompt of a prompt file: .jsonl, one object per line with a
    non-empty string `prompt` (other keys are ignored: a source or a note may ride along); .txt, one prompt
    per line. Blank lines are skipped; a line that is not a prompt is an error naming the file and line."""
    path = Path(path)
    if path.suffix not in PROMPT_FORMATS:
        raise BadInput(f"{path}: a prompt file is {' or '.join(PROMPT_FORMATS)}, one prompt per line")
    prompts = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append((number, line.strip()))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number}: {_syntax_error(e)}") from None
        prompt = value.get("prompt") if isinstance(value, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput(f'{path}:{number}: expected an object with a non-empty string "prompt"')
        prompts.append((number, prompt.strip()))
    if not prompts:
        raise BadInput(f"{path}: holds no prompt")
    return prompts


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads and whose size is what the header declares."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path}: not a safetensors file ({size} bytes; its 8-byte header length is missing)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, SAFETENSORS_HEADER_MAX):
            raise BadInput(f"{path}: not a safetensors file, or cut short (its header claims {length:,} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: not a safetensors file (its header is not a JSON object)")
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise BadInput(f"{path}: not a safetensors file (a tensor entry of its header has no data_offsets)") from None
    check_size(path, size, 8 + length + max(ends, default=0))


def check_model_folder(folder: Path, names: list[str]) -> None:
    """Files `names` of a model folder as the stages read them: every JSON file a JSON object, every
    safetensors file whole, and every shard a safetensors index names present."""
    for name in names:
        if name.endswith(".json"):
            read_json_object(folder / name)
        elif name.endswith(".safetensors"):
            check_safetensors(folder / name)
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        shards = set(read_json_object(folder / index).get("weight_map", {}).values())
        missing = sorted(shards - set(names))
        if missing:
            raise BadInput(f"{folder / index}: names shard(s) the folder lacks: {', '.join(missing)}")


def check_size(path: Path, size: int, declared: int) -> None:
    """A file shorter than its header declares: an interrupted copy or download."""
    if size < declared:
        raise BadInput(
            f"{path}: cut short: {size:,} bytes of the {declared:,} its header declares "
            "(an interrupted copy or download?)"
        )


def _syntax_error(e: Exception) -> str:
    """One line: where and what (PyYAML's own message spans several, with the offending text)."""
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"not valid YAML ({f'line {mark.line + 1}, column {mark.column + 1}: ' if mark else ''}{problem})"


def kind_of(value: Any) -> str:
    """What a YAML or JSON value is, in words ("a list")."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)

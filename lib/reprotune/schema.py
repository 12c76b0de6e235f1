"""params.schema.json (in config/), generated from the dataclasses in config/sections.py (their one source).

How a field becomes a schema property:
  - type from the annotation: int, float, bool, str -> integer, number, boolean, string; `X | None` adds
    "null", and a union of those types lists each (`int | str` -> ["integer", "string"]); tuple[X, ...] ->
    array of X; dict[str, X] -> object with the `keys` given to `key`, each an X;
    a dataclass -> object with additionalProperties false, inline (its keys described by their docstrings),
    or in $defs, named after the class, when it is a list item;
  - `choices` -> enum (which says the type already), `items` -> constraints on the array's items, any other
    keyword of `key` is copied as is; the `key` default -> default (a field without one is required);
  - the docstring under the field -> description; a section's class docstring -> the section's description
    (sections default to {}, so an empty params.yaml is valid), Params' docstring -> the document's.

check.py loads the committed file (nothing is generated at run time); a test keeps it equal to
`generate_schema()`. After editing sections.py run `make schema` (python -m reprotune.schema --write).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from dataclasses import Field, fields, is_dataclass
from functools import cache
from pathlib import Path
from types import NoneType
from typing import Any, get_args, get_origin, get_type_hints

from reprotune.config import sections
from reprotune.config.sections import SECTION_TYPES, Params

SCHEMA_FILE = Path(__file__).parent / "config" / "params.schema.json"
_HEADER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://reprotune.dev/params.schema.json",
    "title": "reprotune params.yaml",
}
_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def generate_schema() -> dict:
    """The params JSON Schema, as params.schema.json should hold it."""
    defs: dict[str, dict] = {}
    props = {name: _section(cls, defs) for name, cls in SECTION_TYPES.items()}
    return {
        **_HEADER,
        "description": class_doc(Params),
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "$defs": defs,
    }


def render(schema: dict) -> str:
    """The file's text: one stable layout, so regenerating an unchanged schema changes no byte."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _section(cls: type, defs: dict) -> dict:
    node = _object(cls, defs)
    return {
        "type": "object",
        "description": class_doc(cls),
        "additionalProperties": False,
        "default": {},
        "properties": node["properties"],
    }


def _object(cls: type, defs: dict) -> dict:
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    props = {f.name: _property(f, hints[f.name], docs.get(f.name), defs) for f in fields(cls)}
    required = [f.name for f in fields(cls) if "default" not in f.metadata]
    node: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if required:
        node["required"] = required
    return {**node, "properties": props}


def _property(f: Field, tp: Any, doc: str | None, defs: dict) -> dict:
    node = _node(tp, f.metadata["schema"], defs)
    if "default" in f.metadata:
        node["default"] = json.loads(json.dumps(f.metadata["default"]))  # tuples -> lists, and a copy
    if doc is not None:
        node["description"] = doc
    return node


def _node(tp: Any, constraints: dict, defs: dict) -> dict:
    """The schema of a value of type `tp` under the keyword arguments given to `key`."""
    rest = dict(constraints)
    choices, items, keys = rest.pop("choices", None), rest.pop("items", {}), rest.pop("keys", ())
    args = get_args(tp)
    if choices is not None:  # an optional key's null is one of its choices
        return {"enum": list(choices) + ([None] if NoneType in args else []), **rest}
    if NoneType in args:
        node = _node(next(a for a in args if a is not NoneType), constraints, defs)
        return {**node, "type": [node["type"], "null"]}
    if get_origin(tp) is tuple:
        return {"type": "array", "items": _item(args[0], items, defs), **rest}
    if get_origin(tp) is dict:
        props = {k: _node(args[1], {}, defs) for k in keys}
        return {"type": "object", "additionalProperties": False, "properties": props, **rest}
    if is_dataclass(tp):
        return {**_object(tp, defs), **rest}
    if args and all(a in _TYPES for a in args):  # int | str: either JSON type, each under its own keywords
        return {"type": [_TYPES[a] for a in args], **rest}
    return {"type": _TYPES[tp], **rest}


def _item(tp: Any, constraints: dict, defs: dict) -> dict:
    if not is_dataclass(tp):
        return _node(tp, constraints, defs)
    name = tp.__name__.removesuffix("Config").lower()  # DatasetConfig -> dataset
    defs[name] = _object(tp, defs)
    return {"$ref": f"#/$defs/{name}"}


def class_doc(cls: type) -> str | None:
    """The class's own docstring on one line (not the signature dataclass puts there when it has none)."""
    doc = ast.get_docstring(_class_defs()[cls.__name__])
    return " ".join(doc.split()) if doc else None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right under its annotation), on one line."""
    body = _class_defs()[cls.__name__].body
    return {
        node.target.id: " ".join(doc.value.value.split())
        for node, doc in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


@cache
def _class_defs() -> dict[str, ast.ClassDef]:
    # Field docstrings are not kept at run time, so they are read from the source.
    tree = ast.parse(inspect.getsource(sections))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reprotune.schema", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_FILE} instead of printing")
    text = render(generate_schema())
    if parser.parse_args(argv).write:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

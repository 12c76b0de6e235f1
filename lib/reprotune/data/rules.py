"""Record rules per dataset type, and normalisation to the canonical record of reprotune.records.

Normalisation: CRLF/CR become LF and text is Unicode NFC, so the same content typed on Windows or
macOS hashes the same. Nothing else is changed: whitespace is part of what the model learns.
A bad record raises RecordError(code, detail); codes are the keys of rejected_by_reason in metrics.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from reprotune.config.sections import DatasetConfig

CANONICAL_ROLES = ("system", "user", "assistant", "tool")
# Role names seen in the wild (ShareGPT, Gemini, OpenAI functions) -> canonical role.
KNOWN_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


class RecordError(Exception):
    """A record breaks its type's rules."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def normalise(record: Any, ds: DatasetConfig) -> dict:
    """The canonical fields of a valid record (without id/source/line); raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    fields = {"alpaca": _alpaca, "chat": _chat, "completion": _completion}[ds.kind](record, ds)
    return {
        "type": ds.kind,
        "system": None,
        "instruction": None,
        "input": None,
        "output": None,
        "messages": None,
        "text": None,
        **fields,
    }


def _alpaca(record: dict, ds: DatasetConfig) -> dict:
    return {
        "instruction": _text(record, ds.field_instruction, required=True),
        "input": _text(record, ds.field_input, required=False) or "",
        "output": _text(record, ds.field_output, required=True),
        "system": _text(record, ds.field_system, required=False) or None,
    }


def _completion(record: dict, ds: DatasetConfig) -> dict:
    return {"text": _text(record, ds.field_text, required=True)}


def _chat(record: dict, ds: DatasetConfig) -> dict:
    if ds.field_messages not in record:
        raise RecordError("missing_field", f"missing field '{ds.field_messages}'")
    messages = record[ds.field_messages]
    if not isinstance(messages, list) or not messages:
        raise RecordError("bad_messages", f"'{ds.field_messages}' must be a non-empty list of messages")
    aliases = {**KNOWN_ROLE_ALIASES, **{a.lower(): role for role, names in ds.roles.items() for a in names}}
    keys = ds.message_property_mappings
    out = [_message(m, i, keys.role, keys.content, aliases) for i, m in enumerate(messages, start=1)]
    dropped = ds.drop_system_message and out[0]["role"] == "system"
    out = out[dropped:]
    for i, m in enumerate(out[1:], start=2 + dropped):  # numbered as in the record
        if m["role"] == "system":
            raise RecordError("misplaced_system", f"message {i}: a system message may only come first")
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no_trainable_turn", "no assistant message: nothing to train on")
    return {"messages": out}


def _message(m: Any, i: int, role_key: str, content_key: str, aliases: dict) -> dict:
    if not isinstance(m, dict):
        raise RecordError("bad_messages", f"message {i} is not an object")
    role = m.get(role_key)
    if not isinstance(role, str) or role.lower() not in aliases:
        known = ", ".join(sorted(aliases))
        raise RecordError(
            "unknown_role", f"message {i}: role {json.dumps(role)} (key '{role_key}') is not one of: {known}"
        )
    content = m.get(content_key)
    if not isinstance(content, str):
        raise RecordError("not_a_string", f"message {i}: '{content_key}' must be a string, got {_kind(content)}")
    if not content.strip():
        raise RecordError("empty", f"message {i}: '{content_key}' is empty")
    return {"role": aliases[role.lower()], "content": _clean(content)}


def _text(record: dict, field: str, required: bool) -> str | None:
    value = record.get(field)
    if value is None:
        if required:
            raise RecordError("missing_field", f"missing field '{field}'")
        return None
    if not isinstance(value, str):
        raise RecordError("not_a_string", f"'{field}' must be a string, got {_kind(value)}")
    if required and not value.strip():
        raise RecordError("empty", f"'{field}' is empty")
    return _clean(value)


def _clean(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__

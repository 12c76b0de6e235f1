"""Readers: one raw record at a time, with where it came from, from JSONL, JSON, Parquet, CSV or the hub.

Every reader streams (memory stays flat for multi-GB files) and never raises on a single bad line:
an undecodable or unparsable line comes back as a RawRecord with `error` set, so validate can keep
it as a reject. A whole file that cannot be read (missing, empty, not JSON at all) raises DataError.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprotune.errors import BadInput

BOM = b"\xef\xbb\xbf"


class DataError(BadInput):
    """A data source cannot be used at all (or on_invalid: error met a bad record)."""


@dataclass(frozen=True)
class RawRecord:
    source: str
    """The dataset path as written in params.yaml."""
    line: int
    """1-based line (JSONL, CSV) or row (JSON array, Parquet, hub)."""
    record: Any
    """The parsed record, or None when `error` is set."""
    error: tuple[str, str] | None = None
    """(reason code, detail) when the line could not be parsed."""
    raw_text: str | None = None
    """The line's text for unparsable lines (non-UTF-8 bytes shown as \\x escapes)."""


def read_source(source: str, root: Path, split: str = "train") -> Iterator[RawRecord]:
    """Raw records of one dataset entry: a local file by its suffix, else a hub dataset id."""
    path = root / source
    if not path.exists():
        yield from read_hub(source, split)
        return
    if path.stat().st_size == 0:
        raise DataError(f"{source}: file is empty")
    reader = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv}
    yield from reader[path.suffix.lower()](path, source)


def read_jsonl(path: Path, source: str) -> Iterator[RawRecord]:
    """JSON Lines, read as bytes so a non-UTF-8 line is a reject, not a crash. BOM and CRLF accepted."""
    parsed = failed = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue  # blank lines are layout, not records
            item = _parse_line(raw, source, number)
            parsed += item.error is None
            failed += item.error is not None
            yield item
    if parsed == 0:
        raise DataError(
            f"{source}: no JSON records found"
            + (f" ({failed} unparsable lines): not JSON Lines" if failed else ": file holds only blank lines")
        )


def _parse_line(raw: bytes, source: str, number: int) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        return RawRecord(source, number, None, ("invalid_utf8", f"not valid UTF-8 at byte {e.start}"), shown)
    try:
        return RawRecord(source, number, json.loads(text))
    except json.JSONDecodeError as e:
        return RawRecord(
            source, number, None, ("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}"), text.rstrip("\r\n")
        )


def read_json(path: Path, source: str) -> Iterator[RawRecord]:
    """A JSON array of records (row = index + 1). A .json file that is really JSON Lines is read as such."""
    try:
        text = path.read_bytes().removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 at byte {e.start}") from None
    if not text.strip():
        raise DataError(f"{source}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON Lines under a .json name
            yield from read_jsonl(path, source)
            return
        raise DataError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON array of records, got a {type(data).__name__}")
    for index, record in enumerate(data, start=1):
        yield RawRecord(source, index, record)


def read_parquet(path: Path, source: str) -> Iterator[RawRecord]:
    """Parquet rows in batches of 4096 (row = 1-based row number)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{source}: not a Parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(source, row, record)


def read_csv(path: Path, source: str) -> Iterator[RawRecord]:
    """CSV with a header row; line = the file line where the row starts. BOM accepted."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            start = reader.line_num + 1
            for record in reader:
                yield RawRecord(source, start, dict(record))
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not valid UTF-8 at byte {e.start}") from None


def read_hub(dataset_id: str, split: str) -> Iterator[RawRecord]:
    """A hub dataset through `datasets.load_dataset` (streamed; offline runs need it in the HF cache)."""
    import datasets

    for index, record in enumerate(datasets.load_dataset(dataset_id, split=split, streaming=True), start=1):
        yield RawRecord(dataset_id, index, record)

"""Readers: one raw record at a time, with where it came from, from JSONL, JSON, Parquet, CSV, text, Arrow
or the hub; a dataset is one file, a folder's files (data_files), or a hub dataset (name, data_files), and
optionally one shard of it (shards, shards_idx).

Every reader streams (memory stays flat for multi-GB files; a shard is the exception: it reads the dataset
twice, once to count its rows, and holds the shard's records to put them in shard order) and never raises
on a single bad line:
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

import numpy as np

from reprotune.config.datafiles import folder_data_files, pattern_files
from reprotune.config.sections import DATA_FORMATS, DatasetConfig
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


def read_dataset(ds: DatasetConfig, root: Path, seed: int) -> Iterator[RawRecord]:
    """Raw records of one params dataset (its file, its folder's files, or a hub dataset); with ds.shards,
    only shard ds.shards_idx, cut as Axolotl cuts it: `Dataset.shuffle(seed).shard(shards, shards_idx)`."""
    if not ds.shards:
        yield from _read_whole(ds, root)
        return
    # datasets' shuffle is default_rng(seed).permutation(n); shard() then takes a contiguous run of the
    # permuted rows, the first n % shards shards one row longer. Counting n needs a first pass.
    n = sum(1 for _ in _read_whole(ds, root))
    size, extra = divmod(n, ds.shards)
    start = size * ds.shards_idx + min(ds.shards_idx, extra)
    stop = start + size + (ds.shards_idx < extra)
    rows = np.random.default_rng(seed).permutation(n)[start:stop]  # (shard rows,) in shard order
    wanted = {int(row): i for i, row in enumerate(rows)}
    shard: list[RawRecord | None] = [None] * len(rows)  # the shard's records, held to be put in its order
    for row, raw in enumerate(_read_whole(ds, root)):
        if row in wanted:
            shard[wanted[row]] = raw
    yield from shard


def _read_whole(ds: DatasetConfig, root: Path) -> Iterator[RawRecord]:
    path = root / ds.path
    if not path.exists():
        yield from read_hub(ds.path, ds.split, ds.name, ds.data_files)
        return
    for file in data_files(path, ds.data_files) if path.is_dir() else [path]:
        source = file.relative_to(root).as_posix() if file != path else ds.path
        yield from read_file(file, source, ds.ds_type, ds.field_text)


def data_files(folder: Path, patterns: tuple[str, ...] | None) -> list[Path]:
    """The files of a dataset folder: each pattern's matches in sorted order (a file once), or every file of
    a known format under the folder, sorted."""
    if patterns is None:
        return folder_data_files(folder)
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = pattern_files(folder, pattern)
        if not matches:
            raise DataError(f"{folder.name}: data_files pattern {pattern!r} matches no file in the folder")
        files.update(dict.fromkeys(matches))
    return list(files)


def read_file(path: Path, source: str, ds_type: str | None, field_text: str = "text") -> Iterator[RawRecord]:
    """Records of one local file, in the format ds_type names or its suffix implies."""
    kind = ds_type or DATA_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{source}: unknown file type; set ds_type (json, parquet, csv, text, arrow)")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: file is empty")
    if kind == "json":
        yield from (read_jsonl if path.suffix.lower() == ".jsonl" else read_json)(path, source)
    elif kind == "text":
        yield from read_text(path, source, field_text)
    else:
        yield from {"parquet": read_parquet, "csv": read_csv, "arrow": read_arrow}[kind](path, source)


def read_jsonl(path: Path, source: str) -> Iterator[RawRecord]:
    """JSON Lines, read as bytes so a non-UTF-8 line is a reject, not a crash. BOM and CRLF accepted."""
    parsed = failed = 0
    for number, raw in _lines(path):
        item = _parse_line(raw, source, number)
        parsed += item.error is None
        failed += item.error is not None
        yield item
    if parsed == 0:
        raise DataError(
            f"{source}: no JSON records found"
            + (f" ({failed} unparsable lines): not JSON Lines" if failed else ": file holds only blank lines")
        )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of each non-blank line (blank lines are layout, not records), read as
    bytes so a non-UTF-8 line is a reject, not a crash; a BOM opening the file is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(BOM)
            if raw.strip():
                yield number, raw


def _not_utf8(raw: bytes, source: str, number: int, e: UnicodeDecodeError) -> RawRecord:
    shown = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    return RawRecord(source, number, None, ("invalid_utf8", f"not valid UTF-8 at byte {e.start}"), shown)


def _parse_line(raw: bytes, source: str, number: int) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _not_utf8(raw, source, number, e)
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
    yield from _rows(table.iter_batches(batch_size=4096), source)


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


def read_text(path: Path, source: str, field: str) -> Iterator[RawRecord]:
    """Plain text, one record {field: line} per non-blank line (the line's end removed). BOM accepted."""
    for number, raw in _lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _not_utf8(raw, source, number, e)
        else:
            yield RawRecord(source, number, {field: text.rstrip("\r\n")})


def read_arrow(path: Path, source: str) -> Iterator[RawRecord]:
    """An Arrow IPC file or stream (datasets' save_to_disk writes streams), row = 1-based row number."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        try:
            file = pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid as e:
            raise DataError(f"{source}: not an Arrow IPC file or stream ({e})") from None
        reader = (file.get_batch(i) for i in range(file.num_record_batches))
    yield from _rows(reader, source)


def _rows(batches, source: str) -> Iterator[RawRecord]:
    """The records of Arrow record batches, row = 1-based row number; a batch that cannot be read (a file
    cut short after its first batches) stops the file with a DataError naming it."""
    import pyarrow as pa

    row, batches = 0, iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{source}: cut short or damaged after row {row} ({e})") from None
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(source, row, record)


def read_hub(
    dataset_id: str, split: str, name: str | None = None, files: tuple[str, ...] | None = None
) -> Iterator[RawRecord]:
    """A hub dataset (configuration `name`, only `files` of its repository when given) through
    `datasets.load_dataset`, streamed; offline runs need it in the HF cache. (`datasets` reads a local
    dataset repository folder the same way, which is how the tests exercise this path.)"""
    import datasets

    rows = datasets.load_dataset(
        dataset_id, name, data_files=list(files) if files else None, split=split, streaming=True
    )
    for index, record in enumerate(rows, start=1):
        yield RawRecord(dataset_id, index, record)

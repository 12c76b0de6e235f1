"""data/validated/records.parquet, the validate stage's output and the tokenize stage's input: the one
module that writes and reads it.

One Parquet schema for every dataset type; fields of other types are null:
  alpaca     -> system?, instruction, input ("" when absent), output
  chat       -> messages: [{role: system|user|assistant|tool, content}], system only first
  completion -> text
Every record also has its content hash `id` and where it came from (`source` file, `line`).
Records are in input order, zstd-compressed, in row groups of ROW_GROUP rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RECORDS = "records.parquet"
ROW_GROUP = 10_000
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("type", pa.string()),
        ("system", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("text", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
ORIGIN = ("id", "source", "line")
CONTENT = tuple(c for c in COLUMNS if c not in ORIGIN)
"""The columns that make a record what it is (hashed into its id)."""


class RecordsWriter:
    """Appends records (dicts holding every column) to records.parquet, one row group at a time."""

    def __init__(self, path: Path):
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")

    def write(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA)
        self._writer.write_table(table, row_group_size=ROW_GROUP)

    def __enter__(self) -> RecordsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()


def count_records(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def iter_record_batches(path: Path, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    """(index of the batch's first record, its records as dicts without the id) per batch of `batch_size`."""
    start = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(COLUMNS[1:])):
        yield start, batch.to_pylist()
        start += batch.num_rows

"""data/validated/records.parquet and datasets.json, the validate stage's output and the tokenize stage's
input: the one module that writes and reads them.

One Parquet schema for every dataset type; fields of other types are null:
  alpaca     -> system?, instruction, input ("" when absent), output
  chat       -> messages: [{role: system|user|assistant|tool, content}], system only first
  completion -> text
Every record also has its content hash `id` and where it came from (`source` file, `line`, and `dataset`:
its entry's index in datasets.json). Records are in input order, zstd-compressed, in row groups of
ROW_GROUP rows.

datasets.json lists one entry per params dataset, data.test_datasets first, then data.datasets, with what
tokenize needs of it: {path, test (a validation-only set), weight, roles_to_train, train_on_eos} (the last
two null: tokenize's own). Keeping these out of the records means a changed weight or masking rewrites only
this small file, not the records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RECORDS = "records.parquet"
DATASETS = "datasets.json"
ROW_GROUP = 10_000
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("dataset", pa.int32()),
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
ORIGIN = ("id", "source", "line", "dataset")
SELF_SOURCE = "data/validated/records.parquet"
"""A replay record's `source` when its prompt is a training record's instruction (self-distillation); its
`line` is then that record's row in records.parquet, from 1."""
REPLAY_CUT = 1
"""A replay record's `dataset`: 0 for an answer that ended on a stop token, REPLAY_CUT for one cut at
max_new_tokens (its text is the base's, its end of turn is not: tokenize leaves that token untrained)."""
CONTENT = tuple(c for c in COLUMNS if c not in ORIGIN)
"""The columns that make a record what it is (hashed into its id)."""


@dataclass(frozen=True)
class DatasetEntry:
    """What tokenize needs to know of one params dataset."""

    path: str
    test: bool
    """From data.test_datasets: every record is a validation record."""
    weight: float
    """Training copies per record (data.datasets[].weight)."""
    roles_to_train: tuple[str, ...] | None
    train_on_eos: str | None

    @classmethod
    def of(cls, ds, test: bool) -> DatasetEntry:
        """The entry of params dataset `ds` (a config DatasetConfig), from data.test_datasets or not."""
        return cls(ds.path, test, ds.weight, ds.roles_to_train, ds.train_on_eos)


def record_id(canonical: dict) -> str:
    """Content hash of a record's CONTENT columns: equal content, equal id (used for dedup)."""
    content = {k: canonical[k] for k in CONTENT}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def write_datasets(path: Path, entries: list[DatasetEntry]) -> None:
    text = json.dumps([asdict(e) for e in entries], indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8", newline="\n")


def read_datasets(path: Path) -> list[DatasetEntry]:
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        DatasetEntry(**{**e, "roles_to_train": tuple(e["roles_to_train"]) if e["roles_to_train"] else None})
        for e in entries
    ]


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


def iter_record_batches(path: Path, batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    """(index of the batch's first record, its records as dicts without the id) per batch of at most
    `batch_size`. Read a row group at a time: pyarrow's ParquetFile.iter_batches keeps memory that grows with
    the file (170 MB more after 1.5M records), a row group read does not."""
    start, parquet = 0, pq.ParquetFile(path)
    for group in range(parquet.metadata.num_row_groups):
        for batch in parquet.read_row_group(group, columns=list(COLUMNS[1:])).to_batches(batch_size):
            yield start, batch.to_pylist()
            start += batch.num_rows


def record_datasets(path: Path) -> np.ndarray:
    """(records,) int32: each record's index in datasets.json."""
    return pq.read_table(path, columns=["dataset"]).column("dataset").to_numpy()

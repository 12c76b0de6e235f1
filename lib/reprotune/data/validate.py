"""The validate stage's core: every record kept (normalised, deduplicated) or rejected with a reason.

Outputs (in the folder given, which the stage swaps in atomically):
  records.parquet    canonical records in input order (format: reprotune.records)
  datasets.json      per dataset what tokenize needs: test set or not, weight, chat masking overrides
  rejects.jsonl      {source, line, reason, detail, record|raw} per rejected record
  duplicates.jsonl   {source, line, duplicate_of} per dropped duplicate
Invariant, checked before returning: read = kept + rejected + duplicates.
data.test_datasets are read first, so a training record equal to a validation record is the duplicate
that is dropped (whatever data.dedup says): the validation set stays as given and never leaks into
training. A validation dataset left without a record stops the stage.
Streaming: memory holds one row group plus a 16-byte-per-record id set for dedup
(about 160 MB for 10M records).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from tqdm import tqdm

from reprotune.config import Params
from reprotune.data.readers import DataError, RawRecord, read_dataset
from reprotune.data.rules import RecordError, normalise
from reprotune.records import DATASETS, RECORDS, ROW_GROUP, DatasetEntry, RecordsWriter, record_id, write_datasets

log = logging.getLogger(__name__)


@dataclass
class Counts:
    read: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0
    by_reason: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
        }


@dataclass(frozen=True)
class ValidateInputs:
    repo_root: Path = Path(".")
    """Local data.datasets paths are read relative to it."""


def validate(params: Params, inputs: ValidateInputs, out_dir: Path) -> dict:
    """Validate every dataset of params.data into `out_dir`; returns metrics: totals, per_source (data.datasets
    by path) and per_test_source (data.test_datasets, when any)."""
    cfg, root = params.data, inputs.repo_root
    datasets = [(ds, True) for ds in cfg.test_datasets] + [(ds, False) for ds in cfg.datasets]
    total = Counts()
    per_source: dict[bool, dict[str, Counts]] = {False: {}, True: {}}  # from test_datasets? -> path -> counts
    with (
        RecordsWriter(out_dir / RECORDS) as writer,
        open(out_dir / "rejects.jsonl", "w", encoding="utf-8", newline="\n") as rejects,
        open(out_dir / "duplicates.jsonl", "w", encoding="utf-8", newline="\n") as duplicates,
    ):
        sink = _Sink(writer, rejects, duplicates, cfg.on_invalid, cfg.dedup)
        for index, (ds, test) in enumerate(datasets):
            counts = per_source[test].setdefault(ds.path, Counts())
            log.info("validating %s (%s%s)", ds.path, ds.type, ", validation set" if test else "")
            before = replace(counts)
            sink.first_reject = None
            records = read_dataset(ds, root, params.tokenize.seed)
            for raw in tqdm(records, desc=f"validate {ds.path}", unit="rec", mininterval=2):
                sink.take(raw, ds, index, test, counts)
            if test and counts.kept == before.kept:
                raise DataError(f"data.test_datasets[{index}] ({ds.path}): no valid record: an empty validation set")
            read = counts.read - before.read
            if read == 0:
                raise DataError(f"{ds.path}: holds no record")
            if counts.kept == before.kept and counts.duplicates == before.duplicates:
                # every record rejected: the wrong file, or the wrong type for it; say so rather than go on
                raise DataError(
                    f"{ds.path}: no valid record among the {read} read (the first rejected: {sink.first_reject}); "
                    f"is it the file meant, and is data.datasets type {ds.type} its layout?"
                )
        sink.flush()
    write_datasets(out_dir / DATASETS, [DatasetEntry.of(ds, test) for ds, test in datasets])
    for counts in [*per_source[False].values(), *per_source[True].values()]:
        for name in ("read", "kept", "rejected", "duplicates"):
            setattr(total, name, getattr(total, name) + getattr(counts, name))
        total.by_reason.update(counts.by_reason)
    assert total.read == total.kept + total.rejected + total.duplicates, total  # counts must balance
    groups = {"per_source": per_source[False], "per_test_source": per_source[True]}
    return {**total.as_dict(), **{g: {p: c.as_dict() for p, c in s.items()} for g, s in groups.items() if s}}


class _Sink:
    """Routes each raw record to the Parquet buffer, the rejects file or the duplicates file."""

    def __init__(self, writer: RecordsWriter, rejects: IO, duplicates: IO, on_invalid: str, dedup: bool):
        self.writer, self.rejects, self.duplicates = writer, rejects, duplicates
        self.on_invalid, self.dedup = on_invalid, dedup
        # record id -> (source, line, from a test dataset) of its first reading; with dedup off only
        # validation records are remembered: a training copy of one is dropped all the same
        self.seen: dict[bytes, tuple[str, int, bool]] = {}
        self.rows: list[dict] = []
        self.first_reject: str | None = None
        """`source:line: reason (detail)` of the current dataset's first reject."""

    def take(self, raw: RawRecord, ds, dataset: int, test: bool, counts: Counts) -> None:
        counts.read += 1
        try:
            if raw.error:
                raise RecordError(*raw.error)
            row = normalise(raw.record, ds)
        except RecordError as e:
            self._reject(raw, e, counts)
            return
        row["id"] = record_id(row)
        key = bytes.fromhex(row["id"])
        first = self.seen.get(key)
        if first is not None and (self.dedup or (first[2] and not test)):  # dedup off: only training copies
            counts.duplicates += 1
            _write_line(
                self.duplicates, {"source": raw.source, "line": raw.line, "duplicate_of": f"{first[0]}:{first[1]}"}
            )
            return
        if first is None and (self.dedup or test):
            self.seen[key] = (raw.source, raw.line, test)
        counts.kept += 1
        self.rows.append({**row, "source": raw.source, "line": raw.line, "dataset": dataset})
        if len(self.rows) >= ROW_GROUP:
            self.flush()

    def _reject(self, raw: RawRecord, e: RecordError, counts: Counts) -> None:
        if self.on_invalid == "error":
            raise DataError(f"{raw.source}:{raw.line}: {e.detail} (data.on_invalid is error)")
        counts.rejected += 1
        counts.by_reason[e.code] += 1
        self.first_reject = self.first_reject or f"{raw.source}:{raw.line}: {e.code} ({e.detail})"
        entry = {"source": raw.source, "line": raw.line, "reason": e.code, "detail": e.detail}
        entry.update({"raw": raw.raw_text} if raw.error else {"record": raw.record})
        _write_line(self.rejects, entry)

    def flush(self) -> None:
        if self.rows:
            self.writer.write(self.rows)
            self.rows = []


def _write_line(f: IO, obj: dict) -> None:
    f.write(json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str) + "\n")

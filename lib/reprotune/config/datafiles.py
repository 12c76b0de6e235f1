"""Which files of a dataset folder are data: one listing for `reprotune check` (which refuses a folder
with none) and for the validate stage's readers (which read them), so the two cannot disagree."""

from __future__ import annotations

from pathlib import Path

from reprotune.config.sections import DATA_FORMATS

# Files datasets' save_to_disk writes beside the data: metadata, never records.
DATASETS_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


def folder_data_files(folder: Path) -> list[Path]:
    """Every file of a known data format under `folder` (datasets' metadata files aside), sorted."""
    files = (f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in DATA_FORMATS)
    return sorted(f for f in files if f.name not in DATASETS_METADATA)


def pattern_files(folder: Path, pattern: str) -> list[Path]:
    """The files a data_files entry (a name or glob under `folder`) matches, sorted."""
    return sorted(f for f in folder.glob(pattern) if f.is_file())

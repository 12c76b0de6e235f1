"""manifest.json: the SHA-256 of every file of an export folder, and its check.

The manifest lists every file but itself by POSIX relative path (`reprotune.io.sha256_tree`), so
a receiver can prove the folder is complete and unaltered with `verify_manifest` (or with
`sha256sum`). Canonical JSON: the same folder always gives the same manifest bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from reprotune.io import sha256_tree, write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "reprotune-manifest/1"


class ManifestError(ValueError):
    """The folder does not match its manifest; str() lists every difference."""


def write_manifest(folder: Path) -> dict:
    """Hash every file under `folder` (except an old manifest) into folder/manifest.json."""
    files = {k: v for k, v in sha256_tree(folder).items() if k != MANIFEST_NAME}
    manifest = {"format": FORMAT, "algorithm": "sha256", "files": files}
    write_json(Path(folder) / MANIFEST_NAME, manifest)
    return manifest


def verify_manifest(folder: Path) -> int:
    """Check `folder` against its manifest; returns the number of files checked, else ManifestError.

    Differences reported: files missing, files not in the manifest, and files whose hash changed.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("algorithm") != "sha256":
        raise ManifestError(f"{path}: unknown manifest format {manifest.get('format')!r}")
    expected: dict[str, str] = manifest["files"]
    actual = {k: v for k, v in sha256_tree(folder).items() if k != MANIFEST_NAME}
    problems = [f"missing: {k}" for k in sorted(expected.keys() - actual.keys())]
    problems += [f"not in manifest: {k}" for k in sorted(actual.keys() - expected.keys())]
    problems += [f"changed: {k}" for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]]
    if problems:
        raise ManifestError(f"{folder} does not match its manifest:\n  " + "\n  ".join(problems))
    return len(expected)

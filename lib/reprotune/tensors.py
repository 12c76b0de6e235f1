"""Streaming safetensors I/O: one tensor in memory at a time (used by the merge and the GGUF writer).

- `read_index` lists every tensor of a checkpoint folder from the file headers alone (8-byte
  little-endian header length, then a JSON header of dtype, shape and data offsets).
- `read_tensor` reads one tensor with plain file reads into its own buffer. The safetensors
  library mmaps whole files instead; every page touched then counts towards the process's RSS
  until the file is closed, so reading a 14 GB checkpoint through it "uses" 14 GB.
- `natural_key`: tensor names in model order (layers.2 before layers.10).
- `write_safetensors` writes the header from the tensors' specs first, then each tensor as it is
  produced, so a shard is never held whole. Its layout is what the safetensors library writes
  (compact JSON header padded with spaces to 8 bytes, data back to back in header order), and
  its reader (offset checks included) loads it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# Hugging Face's names for a one-file checkpoint and for the index of a sharded one.
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorRef:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the data in `file`."""
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def natural_key(name: str) -> list:
    """layers.2 before layers.10: digit runs compare as numbers (re.split alternates str/digits)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


def read_index(model_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of the *.safetensors files in `model_dir`, from their headers only."""
    refs: dict[str, TensorRef] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            refs[name] = TensorRef(file, ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end)
    return refs


def read_tensor(ref: TensorRef, handle) -> torch.Tensor:
    """One tensor, read from the open binary file `handle` into a buffer of its own."""
    buf = bytearray(ref.end - ref.begin)
    handle.seek(ref.begin)
    handle.readinto(buf)
    if not buf:  # frombuffer refuses an empty buffer
        return torch.empty(ref.shape, dtype=ref.dtype)
    return torch.frombuffer(buf, dtype=ref.dtype).reshape(ref.shape)


def write_safetensors(
    path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterable[torch.Tensor]
) -> None:
    """Write a safetensors file: header from `specs` (name, dtype, shape), then `tensors` in that order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: got {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

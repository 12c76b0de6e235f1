"""The machine: `auto` settings resolved at run time (recorded in each stage's metrics), and memory.

  device        cuda when a CUDA device is visible, else cpu
  bf16          true on CUDA with compute capability >= 8.0 (Ampere+), else false
  compute dtype bf16 / fp16 when mixed precision is on, else fp32 (CPU trains in fp32)
  attention     flash_attention_2 when flash-attn is importable on CUDA, else sdpa
  memory        this process's resident set and its peak (Linux /proc), and handing freed heap back
torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Capabilities:
    device: str
    """cuda or cpu."""
    device_name: str
    """GPU name, or cpu."""
    bf16: bool
    """bfloat16 mixed precision on."""
    fp16: bool
    """float16 mixed precision on."""
    compute_dtype: str
    """bfloat16 | float16 | float32: dtype of 4-bit matmuls and of a non-quantized base."""
    attn_implementation: str
    """flash_attention_2 | sdpa | eager."""

    def as_dict(self) -> dict:
        return asdict(self)


def device_type() -> str:
    """cuda when a CUDA device is visible, else cpu: where the stages run their models."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_supports_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve(bf16: str | bool, fp16: bool, attn: str, compute_dtype: str = "auto") -> Capabilities:
    """Concrete settings for this machine from the params' `auto` values."""
    import torch

    cuda = device_type() == "cuda"
    use_bf16 = cuda_supports_bf16() if bf16 == "auto" else bool(bf16)
    if compute_dtype == "auto":
        compute_dtype = "bf16" if use_bf16 else ("fp16" if fp16 else "fp32")
    if attn == "auto":
        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    return Capabilities(
        device=device_type(),
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        bf16=use_bf16,
        fp16=fp16,
        compute_dtype=DTYPE_NAMES[compute_dtype],
        attn_implementation=attn,
    )


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's /proc/self/status (VmRSS, VmHWM, ...) in bytes;
    None where there is no /proc."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB there
    raise KeyError(field)


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. Linux: VmHWM, which starts afresh at exec; getrusage's
    ru_maxrss does not (it keeps the forking parent's resident set), so a stage started from a large
    process would report the parent's size. Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS)."""
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed
    blocks under its mmap threshold, which rises to 32 MB as large blocks are freed, in its heaps: the
    weights of modules already run would stay in the process's RSS, in gaps the next ones may not fit."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

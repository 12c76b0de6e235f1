"""Hardware figures: `auto` settings on this CPU machine, and a peak-memory figure that is the process's own."""

import subprocess
import sys

import pytest

from reprotune.hardware import peak_rss_bytes, resolve


def test_auto_on_cpu_is_fp32_and_sdpa():
    caps = resolve("auto", False, "auto")
    assert (caps.device, caps.bf16, caps.compute_dtype, caps.attn_implementation) == ("cpu", False, "float32", "sdpa")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited figure is a Linux trait")
def test_a_child_started_from_a_large_process_reports_its_own_peak():
    ballast = bytearray(800 * 2**20)  # 800 MiB resident in this process  # noqa: F841
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it counts as resident
    assert peak_rss_bytes() > 800 * 2**20
    code = "from reprotune.hardware import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 400 * 2**20  # a bare interpreter: tens of MiB, not this process's 800+

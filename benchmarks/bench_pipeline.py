"""Pipeline overheads: `reprotune check` start-up, and the cost of a no-op `dvc repro`.

- check: wall time of `reprotune check params.yaml` in a fresh process (target < 3 s: it imports no torch).
- no-op: in a temporary copy of the repo whose stages are all recorded as up to date (stand-in outputs
  and `dvc commit`), the wall time of `dvc repro` against bare DVC on a trivial pipeline with the same
  number of stages (each `cmd: true`), as a ratio. A fake `python` first on PATH records any stage
  script that starts: on a no-op none may.

    python benchmarks/bench_pipeline.py
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import copy_repo  # noqa: E402
from test_param_impact import record_all_stages_as_run, stages_of  # noqa: E402

TARGET_CHECK_S = 3.0
REPEATS = 5


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def check_seconds() -> float:
    return statistics.median(timed([str(BIN / "reprotune"), "check", "params.yaml"], REPO) for _ in range(REPEATS))


def trivial_pipeline(root: Path, stages: int) -> Path:
    """A git+DVC repo with `stages` chained stages that each copy one small file."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True)
    (root / "s0").write_text("x\n")
    lines = ["stages:"]
    for i in range(1, stages + 1):
        lines += [f"  s{i}:", f"    cmd: cp s{i - 1} s{i}", f"    deps: [s{i - 1}]", f"    outs: [s{i}]"]
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=root, check=True, capture_output=True)
    return root


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = copy_repo(tmp / "repo")
        with contextlib.redirect_stdout(sys.stderr):
            record_all_stages_as_run(repo)
        n_stages = len(stages_of(repo))
        trap = tmp / "trap"
        trap.mkdir()
        started = tmp / "started.log"
        (trap / "python").write_text(f'#!/bin/sh\necho "$@" >> {started}\nexit 1\n')
        (trap / "python").chmod(0o755)
        env = {**os.environ, "PATH": f"{trap}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
        dvc = str(BIN / "dvc")
        ours = statistics.median(timed([dvc, "repro"], repo, env) for _ in range(REPEATS))
        bare_repo = trivial_pipeline(tmp / "bare", n_stages)
        bare = statistics.median(timed([dvc, "repro"], bare_repo, env) for _ in range(REPEATS))
        scripts_started = started.read_text().splitlines() if started.exists() else []
    return {
        "check_s": check_seconds(),
        "stages": n_stages,
        "noop_repro_s": ours,
        "bare_dvc_noop_s": bare,
        "noop_ratio": ours / bare,
        "stage_scripts_started": scripts_started,
    }


def main() -> None:
    r = run()
    ok = {True: "PASS", False: "FAIL"}
    print(f"reprotune check: {r['check_s']:.2f} s (median of {REPEATS})")
    print(f"target: check < {TARGET_CHECK_S:g} s -> {ok[r['check_s'] < TARGET_CHECK_S]}")
    print(
        f"no-op dvc repro, {r['stages']} stages: {r['noop_repro_s']:.2f} s; bare DVC, {r['stages']} trivial "
        f"stages: {r['bare_dvc_noop_s']:.2f} s; ratio {r['noop_ratio']:.2f}x"
    )
    print(
        f"stage scripts started on the no-op: {len(r['stage_scripts_started'])} -> {ok[not r['stage_scripts_started']]}"
    )


if __name__ == "__main__":
    main()

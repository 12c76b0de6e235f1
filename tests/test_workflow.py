"""The retrain workflow parses, triggers on data and params changes, and calls commands that exist."""

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github/workflows/retrain.yml"
DVC = Path(sys.executable).parent / "dvc"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_commands() -> list[list[str]]:
    commands = []
    for step in workflow()["jobs"]["retrain"]["steps"]:
        for line in step.get("run", "").splitlines():
            line = line.strip().removeprefix('PATH="$PWD/.venv/bin:$PATH" ')
            if line and not line.startswith(("{", "}", "echo", "git")):
                commands.append(shlex.split(line.replace(' >> "$GITHUB_STEP_SUMMARY"', "")))
    return commands


def test_triggers_on_data_and_params():
    triggers = workflow()[True]  # YAML 1.1 reads the key `on` as true
    for event in ("push", "pull_request"):
        paths = triggers[event]["paths"]
        assert {"**.dvc", "data/**", "params.yaml"} <= set(paths)


def test_dvc_commands_and_flags_exist():
    seen = set()
    for command in run_commands():
        if command[0] == ".venv/bin/dvc":
            sub = [w for w in command[1:3] if not w.startswith("-") and not w.startswith("$")]
            help_text = subprocess.run([str(DVC), *sub, "--help"], capture_output=True, text=True).stdout
            assert help_text, f"dvc {' '.join(sub)} does not exist"
            for flag in (w for w in command if w.startswith("--")):
                assert flag in help_text, f"dvc {' '.join(sub)} has no {flag}"
            seen.add(" ".join(sub))
    assert {"pull", "repro", "push", "metrics diff", "params diff"} <= seen


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    env = workflow()["env"]
    assert f"\n{env['SETUP_TARGET']}:" in makefile
    assert "\nsetup-gpu:" in makefile  # the documented GPU variant
    for command in run_commands():
        if command[0] == "make":
            target = command[1].replace("$SETUP_TARGET", env["SETUP_TARGET"])
            assert f"\n{target}:" in makefile, target

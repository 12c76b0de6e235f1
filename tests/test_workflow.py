"""The workflows parse, retrain triggers on data and params changes, and every command they call exists with
the flags given (tests/test_workflow_steps.py runs them)."""

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github/workflows/retrain.yml"
WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))
DVC = Path(sys.executable).parent / "dvc"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_commands() -> list[list[str]]:
    commands = []
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job["steps"]:
                script = step.get("run", "").replace("\\\n", " ")
                for line in script.splitlines():
                    line = line.strip().removeprefix('PATH="$PWD/.venv/bin:$PATH" ')
                    if line.startswith((".venv/bin/dvc", "make")):
                        commands.append(shlex.split(line.replace(' >> "$GITHUB_STEP_SUMMARY"', ""), comments=True))
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
    retrain = {"pull", "repro", "push", "metrics diff", "params diff"}
    assert retrain | {"exp run", "exp push", "exp pull", "exp show"} <= seen


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    env = workflow()["env"]
    assert f"\n{env['SETUP_TARGET']}:" in makefile
    assert "\nsetup-gpu:" in makefile  # the documented GPU variant
    for command in run_commands():
        if command[0] == "make":
            target = command[1].replace("$SETUP_TARGET", env["SETUP_TARGET"])
            assert f"\n{target}:" in makefile, target

"""A small local runner for this repo's GitHub Actions workflows, so tests execute the workflow files' own
`run:` steps instead of a copy of them.

What it does as GitHub does: workflow, job and step `env:` (step wins), `${{ }}` expressions over the
`github`, `inputs`, `secrets` (always empty here), `env`, `steps`, `needs` and `matrix` contexts, step and
job `if:`, `$GITHUB_OUTPUT`, `$GITHUB_ENV`, `$GITHUB_STEP_SUMMARY`, job `outputs:`, `needs:` order and a
`strategy.matrix` expanded from a list; `run:` goes to `bash --noprofile --norc -eo pipefail` in the
job's workspace; after a failed step the rest are skipped (unless their `if:` says `always()`).

What stands in for a hosted runner: `actions/checkout` is `git clone` of a local origin (a bare repo) at
the event's ref, full history; `actions/setup-python` is a no-op (this interpreter is used); each job gets
a fresh workspace whose `.venv` links to the venv running the tests, with pyproject.toml and
constraints.txt dated before its `.installed` stamp, as a cached venv would be, so `make setup` finds it
current. Anything else (another action, an unknown function) fails loudly rather than being skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

VENV = Path(sys.prefix)


@dataclass
class StepResult:
    name: str
    outcome: str  # success | failure | skipped
    log: str = ""


@dataclass
class JobResult:
    job: str
    workspace: Path
    steps: list[StepResult] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return all(step.outcome != "failure" for step in self.steps)

    def step(self, name: str) -> StepResult:
        return next(step for step in self.steps if step.name == name)

    @property
    def log(self) -> str:
        return "\n".join(step.log for step in self.steps)


# ---- expressions: the subset GitHub documents that these workflows use -----------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>\d+(?:\.\d+)?)|(?P<op>==|!=|&&|\|\||!|\(|\)|,)"
    r"|(?P<name>[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*))"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot parse expression {text!r} at {text[pos:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _truthy(value) -> bool:
    return value not in (None, False, 0, "", [])


def _json_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Parser:
    """Recursive descent: or > and > equality > not > primary, as in GitHub's operator precedence."""

    def __init__(self, text: str, context: dict, status: str):
        self.tokens, self.context, self.status, self.i = _tokens(text), context, status, 0

    def parse(self):
        value = self.or_()
        if self.i != len(self.tokens):
            raise ValueError(f"trailing tokens in expression: {self.tokens[self.i :]}")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        self.i += 1
        return self.tokens[self.i - 1]

    def or_(self):
        value = self.and_()
        while self.peek() == "||":
            self.take()
            right = self.and_()
            value = value if _truthy(value) else right
        return value

    def and_(self):
        value = self.equality()
        while self.peek() == "&&":
            self.take()
            right = self.equality()
            value = right if _truthy(value) else value
        return value

    def equality(self):
        value = self.unary()
        while self.peek() in ("==", "!="):
            op = self.take()[1]
            right = self.unary()
            equal = str(value).lower() == str(right).lower() if isinstance(value, str) else value == right
            value = equal if op == "==" else not equal
        return value

    def unary(self):
        if self.peek() == "!":
            self.take()
            return not _truthy(self.unary())
        return self.primary()

    def primary(self):
        kind, text = self.take()
        if text == "(":
            value = self.or_()
            self.take()
            return value
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return float(text) if "." in text else int(text)
        if text in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[text]
        if self.peek() == "(":
            return self.call(text)
        return self.lookup(text)

    def call(self, name: str):
        self.take()
        args = []
        while self.peek() != ")":
            args.append(self.or_())
            if self.peek() == ",":
                self.take()
        self.take()
        functions = {
            "success": lambda: self.status == "success",
            "failure": lambda: self.status == "failure",
            "always": lambda: True,
            "cancelled": lambda: False,
            "fromJSON": lambda text: json.loads(text),
            "toJSON": lambda value: json.dumps(value),
        }
        if name not in functions:
            raise ValueError(f"expression function {name}() is not supported by this runner")
        return functions[name](*args)

    def lookup(self, path: str):
        value = self.context
        for part in re.findall(r"[\w-]+|\[\d+\]", path):
            if part.startswith("["):
                value = value[int(part[1:-1])] if isinstance(value, list) else None
            else:
                value = value.get(part) if isinstance(value, dict) else None
        return value


def evaluate(text: str, context: dict, status: str = "success"):
    return _Parser(text, context, status).parse()


def substitute(text: str, context: dict) -> str:
    """`${{ expr }}` inside a string, each replaced by its value as GitHub prints it."""

    def value(match: re.Match) -> str:
        result = evaluate(match.group(1), context)
        return "" if result is None else _json_text(result) if not isinstance(result, bool) else str(result).lower()

    return re.sub(r"\$\{\{(.*?)\}\}", value, str(text))


def condition(text, context: dict, status: str) -> bool:
    if text is None:
        return status == "success"
    expression = str(text).strip()
    if expression.startswith("${{") and expression.endswith("}}"):
        expression = expression[3:-2]
    uses_status = re.search(r"\b(success|failure|always|cancelled)\(", expression)
    result = _truthy(evaluate(expression, context, status))
    return result if uses_status else result and status == "success"


# ---- running ---------------------------------------------------------------------------------------------


def _read_pairs(path: Path) -> dict[str, str]:
    """KEY=VALUE lines and KEY<<EOF heredocs, the two forms GitHub accepts in GITHUB_OUTPUT and GITHUB_ENV."""
    pairs, lines = {}, path.read_text().splitlines() if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and "=" not in line.split("<<")[0]:
            key, marker = line.split("<<", 1)
            end = lines.index(marker, i + 1)
            pairs[key] = "\n".join(lines[i + 1 : end])
            i = end + 1
            continue
        if "=" in line:
            key, value = line.split("=", 1)
            pairs[key] = value
        i += 1
    return pairs


def _provision_venv(workspace: Path) -> None:
    stamp = VENV / ".installed"
    if not stamp.exists():
        raise RuntimeError(f"{stamp} is missing: run `make setup` before the workflow tests")
    (workspace / ".venv").symlink_to(VENV)
    older = stamp.stat().st_mtime - 60
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(workspace / name, (older, older))


@dataclass
class Runner:
    """Runs one workflow file from `repo` against `origin` (a bare git repo), each job in its own workspace
    under `root`."""

    workflow_file: Path
    origin: Path
    root: Path
    base_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.workflow = yaml.safe_load(self.workflow_file.read_text())
        self.runs = 0

    def run(self, event_name: str, event: dict, ref: str = "main", inputs: dict | None = None) -> dict:
        """Every job in `needs:` order; returns {job id: [JobResult, one per matrix entry]}."""
        sha = self._git(self.origin, "rev-parse", ref)
        github = {"event_name": event_name, "event": event, "ref": f"refs/heads/{ref}", "ref_name": ref, "sha": sha}
        inputs = inputs or {}
        if event_name == "workflow_dispatch":
            declared = (self.workflow[True]["workflow_dispatch"] or {}).get("inputs", {})
            inputs = {name: inputs.get(name, spec.get("default", "")) for name, spec in declared.items()}
            github["event"] = {**event, "inputs": inputs}
        results: dict[str, list[JobResult]] = {}
        for job_id in self._job_order():
            job = self.workflow["jobs"][job_id]
            needs = [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", [])
            needs_context = {
                name: {
                    "result": "success" if all(r.ok for r in results[name]) else "failure",
                    "outputs": results[name][-1].outputs if results[name] else {},
                }
                for name in needs
            }
            context = {"github": github, "inputs": inputs, "secrets": {}, "needs": needs_context}
            status = "success" if all(n["result"] == "success" for n in needs_context.values()) else "failure"
            if not condition(job.get("if"), context, status):
                results[job_id] = []
                continue
            results[job_id] = [
                self._run_job(job_id, job, {**context, "matrix": matrix}, ref) for matrix in self._matrix(job, context)
            ]
        return results

    def _job_order(self) -> list[str]:
        jobs, order = self.workflow["jobs"], []
        while len(order) < len(jobs):
            for job_id, job in jobs.items():
                needs = [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", [])
                if job_id not in order and all(n in order for n in needs):
                    order.append(job_id)
        return order

    @staticmethod
    def _matrix(job: dict, context: dict) -> list[dict]:
        matrix = job.get("strategy", {}).get("matrix")
        if matrix is None:
            return [{}]
        if isinstance(matrix, str):
            matrix = evaluate(matrix.strip()[3:-2], context)
        axes = {key: evaluate(v.strip()[3:-2], context) if isinstance(v, str) else v for key, v in matrix.items()}
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def _run_job(self, job_id: str, job: dict, context: dict, ref: str) -> JobResult:
        self.runs += 1
        workspace = self.root / f"run{self.runs}-{job_id}"
        files = {name: self.root / f"run{self.runs}-{job_id}.{name}" for name in ("output", "env", "summary")}
        for path in files.values():
            path.write_text("")
        workspace.mkdir()
        result = JobResult(job_id, workspace)
        env_context: dict[str, str] = {}
        for layer in (self.workflow.get("env", {}), job.get("env", {})):
            env_context |= {k: substitute(v, {**context, "env": env_context}) for k, v in layer.items()}
        context = {**context, "env": env_context, "steps": {}}
        status = "success"
        for index, step in enumerate(job["steps"]):
            name = step.get("name") or step.get("uses") or f"step {index}"
            if not condition(step.get("if"), context, status):
                result.steps.append(StepResult(name, "skipped"))
                continue
            step_env = {k: substitute(v, {**context, "env": env_context}) for k, v in step.get("env", {}).items()}
            if "uses" in step:
                outcome, log = self._action(step, workspace, ref)
            else:
                outcome, log = self._shell(step, workspace, files, context, {**env_context, **step_env})
            result.steps.append(StepResult(name, outcome, log))
            if "id" in step:
                context["steps"][step["id"]] = {"outputs": _read_pairs(files["output"]), "outcome": outcome}
            files["output"].write_text("")
            if outcome == "failure":
                status = "failure"
        context_for_outputs = {**context, "env": env_context}
        result.outputs = {k: substitute(v, context_for_outputs) for k, v in job.get("outputs", {}).items()}
        result.summary = files["summary"].read_text()
        return result

    def _action(self, step: dict, workspace: Path, ref: str) -> tuple[str, str]:
        action = step["uses"].split("@")[0]
        if action == "actions/checkout":
            subprocess.run(["git", "clone", "-q", "--branch", ref, str(self.origin), str(workspace)], check=True)
            _provision_venv(workspace)
            return "success", f"cloned {self.origin} at {ref}"
        if action == "actions/setup-python":
            return "success", f"python {sys.version.split()[0]} (this interpreter)"
        raise ValueError(f"action {action} is not supported by this runner")

    def _shell(self, step: dict, workspace: Path, files: dict, context: dict, env: dict) -> tuple[str, str]:
        script = substitute(step["run"], {**context, "env": env})
        runner_env = {
            **os.environ,
            **self.base_env,
            **_read_pairs(files["env"]),
            **env,
            "GITHUB_OUTPUT": str(files["output"]),
            "GITHUB_ENV": str(files["env"]),
            "GITHUB_STEP_SUMMARY": str(files["summary"]),
            "GITHUB_WORKSPACE": str(workspace),
            "RUNNER_TEMP": str(self.root),
            "CI": "true",
            "GITHUB_ACTIONS": "true",
        }
        runner_env.pop("VIRTUAL_ENV", None)
        process = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            cwd=workspace,
            env=runner_env,
            capture_output=True,
            text=True,
        )
        return ("success" if process.returncode == 0 else "failure"), process.stdout + process.stderr

    @staticmethod
    def _git(repo: Path, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

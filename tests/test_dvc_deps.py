"""dvc.yaml lists, for each stage, exactly the library code the stage runs.

The code a stage runs is found from its script by following `reprotune` imports (module level and
inside functions) with `ast`. Every such file must be covered by a listed dep (so editing it reruns
the stage), and every listed code dep must hold code the stage runs (so editing unrelated code does
not rerun it).
"""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = LIB / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return {n for n in names if n.split(".")[0] == "reprotune"}


def code_run_by(script: Path) -> set[Path]:
    """Every reprotune source file reachable from `script` by imports (packages' __init__ included)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                found = module_file(".".join(parts[:i]))
                if found and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == REPO / d or (REPO / d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_are_exact(stage):
    deps = STAGES[stage]["deps"]
    script = REPO / STAGES[stage]["cmd"].split()[-1]
    assert script.relative_to(REPO).as_posix() in deps, f"{stage}: its script is not a dep"
    runs = code_run_by(script)
    missing = sorted(p.relative_to(REPO).as_posix() for p in runs if not covered(p, deps))
    assert not missing, f"{stage} runs code dvc.yaml does not list: {missing}"
    for dep in deps:
        path = REPO / dep
        if dep.startswith("lib/") and (path.is_dir() or path.suffix == ".py"):
            assert any(p == path or path in p.parents for p in runs), f"{stage} lists {dep} but never runs it"

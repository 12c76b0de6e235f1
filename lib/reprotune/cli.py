"""The `reprotune` command: what users run by hand beside `dvc repro`.

reprotune check [params.yaml]   every problem with its key path; exit 2 on problems, 0 if clean
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprotune.config import EXIT_BAD_INPUT
from reprotune.config.check import check_params, read_yaml


def check(path: Path) -> int:
    """Print every problem in params file `path`; return the exit code."""
    raw, problems = read_yaml(path)
    # paths in params are relative to the project (the folder with dvc.yaml), wherever the file lies
    root = next((d for d in (path.parent, *path.parent.resolve().parents) if (d / "dvc.yaml").is_file()), path.parent)
    if not problems:
        _, problems = check_params(raw, repo_root=root)
    if not problems:
        print(f"{path}: OK")
        return 0
    print(f"{path}: {len(problems)} problem{'s' * (len(problems) != 1)}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check params.yaml without loading any model")
    p_check.add_argument("params", nargs="?", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    return check(args.params)


if __name__ == "__main__":
    sys.exit(main())

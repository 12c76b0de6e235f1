"""The `reprotune` command: what users run by hand beside `dvc repro`.

reprotune check [params.yaml]   every problem with its key path; exit 2 on problems, 0 if clean
reprotune import-axolotl AXOLOTL.yml [-o params.yaml]
                                an Axolotl config as params.yaml, every key accounted for in a table;
                                exit 2 when a key cannot be honoured (the file is written anyway)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reprotune.config import EXIT_BAD_INPUT
from reprotune.config.check import check_params, read_yaml, report
from reprotune.errors import BadInput


def check(path: Path) -> int:
    """Print every problem in params file `path`; return the exit code."""
    raw, problems = read_yaml(path)
    # paths in params are relative to the project (the folder with dvc.yaml), wherever the file lies
    root = project_root(path.parent)
    if not problems:
        _, problems = check_params(raw, repo_root=root)
    if not problems:
        print(f"{path}: OK")
        return 0
    print(report(str(path), problems), file=sys.stderr)
    return EXIT_BAD_INPUT


def project_root(start: Path) -> Path:
    """The folder with dvc.yaml at or above `start` (paths in params are relative to it)."""
    return next((d for d in (start, *start.resolve().parents) if (d / "dvc.yaml").is_file()), start)


def import_axolotl(source: Path, out: Path) -> int:
    from reprotune.axolotl import import_axolotl as run

    root = project_root(Path.cwd())  # data and model paths in params are relative to the project
    template = out if out.is_file() else root / "params.yaml"
    if not template.is_file():
        print(f"no params.yaml to take the layout and comments from at {template}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(source, out, template, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check params.yaml without loading any model")
    p_check.add_argument("params", nargs="?", default="params.yaml", type=Path)
    p_import = sub.add_parser("import-axolotl", help="write params.yaml from an Axolotl config")
    p_import.add_argument("config", type=Path, help="the Axolotl YAML config")
    p_import.add_argument("-o", "--output", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        if args.command == "import-axolotl":
            return import_axolotl(args.config, args.output)
        return check(args.params)
    except BadInput as e:  # a file that cannot be used: one line naming it, no traceback
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

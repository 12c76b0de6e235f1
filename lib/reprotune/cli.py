"""The `reprotune` command: what users run by hand beside `dvc repro`.

reprotune check [params.yaml]   every problem with its key path; exit 2 on problems, 0 if clean
reprotune import-axolotl AXOLOTL.yml [-o params.yaml]
                                an Axolotl config as params.yaml, every key accounted for in a table;
                                exit 2 when a key cannot be honoured (the file is written anyway)
reprotune chat [MODEL] [--compare | --adapter] [--prompt TEXT ...]
                                talk to a model folder (default models/export), answers streamed
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


def chat(args) -> int:
    from reprotune.chat import Sampling, run

    if args.model is not None and args.adapter:
        raise BadInput("reprotune chat: --adapter loads models/adapter on models/base; give no MODEL with it")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return run(args.model, args.adapter, args.compare, args.prompt, args.system, sampling, args.each)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprotune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check params.yaml without loading any model")
    p_check.add_argument("params", nargs="?", default="params.yaml", type=Path)
    p_import = sub.add_parser("import-axolotl", help="write params.yaml from an Axolotl config")
    p_import.add_argument("config", type=Path, help="the Axolotl YAML config")
    p_import.add_argument("-o", "--output", type=Path, default=Path("params.yaml"))
    p_chat = sub.add_parser("chat", help="talk to a model folder (default models/export) in the terminal")
    p_chat.add_argument("model", nargs="?", type=Path, help="a model folder (default models/export)")
    which = p_chat.add_mutually_exclusive_group()
    which.add_argument("--compare", action="store_true", help="answer with models/base and the tuned model")
    which.add_argument("--adapter", action="store_true", help="models/adapter on the 4-bit models/base")
    p_chat.add_argument("--prompt", action="append", default=[], help="answer this and exit (repeatable)")
    p_chat.add_argument("--each", action="store_true", help="a fresh conversation for each prompt")
    p_chat.add_argument("--system", help="a system message opening the conversation")
    p_chat.add_argument("--max-new-tokens", type=int, default=256)
    p_chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p_chat.add_argument("--top-p", type=float, default=1.0)
    p_chat.add_argument("--seed", type=int, default=0, help="of the sampling, with --temperature")
    args = parser.parse_args(argv)
    try:
        if args.command == "import-axolotl":
            return import_axolotl(args.config, args.output)
        if args.command == "chat":
            return chat(args)
        return check(args.params)
    except BadInput as e:  # a file that cannot be used: one line naming it, no traceback
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

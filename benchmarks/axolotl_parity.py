"""Token-for-token parity with Axolotl (by hand, never in CI): the same files and tokenizer through
`axolotl preprocess` and through reprotune's validate + prompt strategies, compared sequence by sequence.

For each tokenizer (the built-in model's byte-level BPE with ChatML; `llama_spm`, a Llama-style
SentencePiece tokenizer with a Llama-2 [INST] template, from tests/fixtures) and each dataset type of
the shipped sample data (`alpaca`: data/sample/alpaca.jsonl; `chat_template`: data/sample/chat.jsonl,
ShareGPT keys, Axolotl's documented defaults roles_to_train [assistant] and train_on_eos turn):
input ids and labels must be equal (labels from position 1: position 0 is never a target in a causal LM
loss, and reprotune always stores -100 there). A difference Axolotl is known to make on purpose-less
grounds is counted as *expected*, with its reason, only when recomputing Axolotl's way from reprotune's
own text reproduces Axolotl's output exactly:
- `eot_masked`: Axolotl's eot_tokens default to the EOS token, so a template whose turns end with another
  token (ChatML's <|im_end|>) leaves that end of turn untrained unless the config sets `eot_tokens`;
  reprotune trains it (the model must learn to stop). Checked: the ids are equal and the labels differ
  only at end-of-turn special tokens that reprotune trains and Axolotl masks.
- `response_tokenized_apart`: Axolotl's alpaca strategy tokenizes the prompt and the response separately;
  on a SentencePiece tokenizer the response then starts with a word-start piece ("▁") that the served
  prompt never produces. reprotune tokenizes the text as the model reads it. Checked: Axolotl's ids equal
  tokenizer(prompt) + tokenizer(response) (its BOS stripped) + EOS, with reprotune's prompt text.
Anything else is unexpected: the first one is printed decoded. Exit 1 when any is unexpected.
reprotune's side is the same Axolotl config through `reprotune import-axolotl`'s translation, then
validate's rules and the prompt strategies (tests/fixtures/axolotl_parity.py). With --write-golden, the
first rows of Axolotl's output are kept in tests/fixtures/axolotl/parity/ for tests/test_axolotl_parity.py.

Axolotl goes in its own venv (never this project's dependencies): `python -m venv .venv-axolotl &&
.venv-axolotl/bin/pip install torch==2.13.0 && .venv-axolotl/bin/pip install axolotl==0.19.0` (about 3 min).

    python benchmarks/axolotl_parity.py --axolotl-python .venv-axolotl/bin/python [--write-golden]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test tokenizers' builders
try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from fixtures.axolotl_parity import (
    DATASETS,
    GOLDEN_ROWS,
    RENDER_GOLDEN,
    REPO,
    TEMPLATE_GOLDEN_ROWS,
    TEMPLATE_PREFIX,
    axolotl_config,
    classify,
    first_difference,
    golden_path,
    model_folder,
    reprotune_side,
    template_comparisons,
)
from fixtures.make_tokenize_fixtures import load_tokenizer

# Template files Axolotl 0.19 ships whose names its config schema (the ChatTemplate enum) does not accept
NOT_NAMED_BY_AXOLOTL = ("phi_4",)


def axolotl_templates(axolotl: Path) -> Path:
    """The folder of Axolotl's template files in its venv (`axolotl` is its console script)."""
    where = "import os, axolotl.utils.chat_templates as m; print(os.path.dirname(m.__file__))"
    python = axolotl.parent / "python"
    folder = subprocess.run([str(python), "-c", where], capture_output=True, text=True).stdout.strip()
    return Path(folder) / "templates"


def axolotl_side(axolotl: Path, model_dir: Path, dataset: str, work: Path) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every row `axolotl preprocess` writes for the dataset, in its order."""
    config = axolotl_config(dataset)
    if config["chat_template"] in NOT_NAMED_BY_AXOLOTL:  # its file, given as Axolotl's jinja
        config["chat_template_jinja"] = (axolotl_templates(axolotl) / f"{config['chat_template']}.jinja").read_text()
        config["chat_template"] = "jinja"
    config["base_model"] = str(model_dir)
    config["datasets"] = [{**entry, "path": str(REPO / entry["path"])} for entry in config["datasets"]]
    config |= {"dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / "out")}
    (work / "axolotl.yml").write_text(yaml.safe_dump(config))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    command = [str(axolotl), "preprocess", str(work / "axolotl.yml")]
    run = subprocess.run(command, env={**os.environ, **offline}, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"axolotl preprocess failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    import datasets

    (prepared,) = [p for p in (work / "prepared").iterdir() if p.is_dir()]
    rows = datasets.load_from_disk(str(prepared))
    return [(list(r["input_ids"]), list(r["labels"])) for r in rows]


# Rendered in Axolotl's venv, by Axolotl's own lookup of a template name (get_chat_template) and its
# transformers: reads {"model": folder, "names": [...], "cases": [[messages, add_generation_prompt], ...]} on
# stdin, writes {name: [render or "<refused>", ...]}.
AXOLOTL_RENDER = """
import json, sys, jinja2
from transformers import AutoTokenizer
from axolotl.utils.chat_templates import get_chat_template
job = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(job["model"])
out = {}
for name in job["names"]:
    template = get_chat_template(name)
    out[name] = []
    for messages, generation in job["cases"]:
        try:
            out[name].append(tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=generation))
        except jinja2.TemplateError:
            out[name].append("<refused>")
print(json.dumps(out))
"""


def render_cases() -> list[tuple[list[dict], bool]]:
    """The shipped conversations as they are, each with a system message where it has none, and each
    without its last answer behind a generation prompt."""
    from reprotune.data.rules import KNOWN_ROLE_ALIASES

    lines = (REPO / "data/sample/chat.jsonl").read_text().splitlines()[:200]
    conversations = [
        [{"role": KNOWN_ROLE_ALIASES[m["from"]], "content": m["value"]} for m in json.loads(line)["conversations"]]
        for line in lines
    ]
    cases = [(c, False) for c in conversations] + [(c[:-1], True) for c in conversations]
    system = {"role": "system", "content": "Answer briefly."}
    return cases + [([system, *c], False) for c in conversations if c[0]["role"] != "system"]


def ours(tokenizer, name: str, cases: list) -> list[str]:
    import jinja2

    from reprotune.model.chat_templates import named_template

    out = []
    for messages, generation in cases:
        try:
            out.append(
                tokenizer.apply_chat_template(
                    messages, chat_template=named_template(name), tokenize=False, add_generation_prompt=generation
                )
            )
        except jinja2.TemplateError:
            out.append("<refused>")
    return out


def template_parity(axolotl_python: Path, model_dir: Path, tokenizer, write_golden: bool) -> int:
    """Render the cases with reprotune's named templates here and with Axolotl's templates of the same names
    in Axolotl's venv; print the equal counts per template; return the number of renders that differ."""
    from reprotune.config.sections import CHAT_TEMPLATE_NAMES

    cases = render_cases()
    job = json.dumps({"model": str(model_dir), "names": list(CHAT_TEMPLATE_NAMES), "cases": cases})
    run = subprocess.run([str(axolotl_python), "-c", AXOLOTL_RENDER], input=job, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"rendering in Axolotl's venv failed:\n{run.stderr[-3000:]}")
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    differ = 0
    print(f"\n{'template':<20} {'renders':>8} {'equal':>6} {'refused':>8}")
    for name in CHAT_TEMPLATE_NAMES:
        mine = ours(tokenizer, name, cases)
        equal = sum(a == b for a, b in zip(mine, theirs[name]))
        differ += len(cases) - equal
        print(f"{name:<20} {len(cases):>8} {equal:>6} {theirs[name].count('<refused>'):>8}")
    if write_golden:  # the first cases of each kind: plain, generation prompt, system added
        picks = [0, 1, 12, 200, 212, 400, 401]  # 12: a conversation with its own system message
        golden = {
            "axolotl": "0.19.0",
            "cases": [cases[i] for i in picks],
            "renders": {name: [theirs[name][i] for i in picks] for name in CHAT_TEMPLATE_NAMES},
        }
        RENDER_GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        RENDER_GOLDEN.write_text(json.dumps(golden, indent=0, ensure_ascii=False) + "\n")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axolotl-python", type=Path, required=True, help="python of the venv Axolotl is in")
    parser.add_argument("--tokenizers", nargs="+", default=["builtin", "llama_spm"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument(
        "--templates", action="store_true", help="also each named chat template's comparison (builtin tokenizer)"
    )
    parser.add_argument("--write-golden", action="store_true", help=f"keep Axolotl's first {GOLDEN_ROWS} rows")
    args = parser.parse_args()
    axolotl = args.axolotl_python.parent / "axolotl"
    from transformers import AutoTokenizer

    unexpected_total = 0
    print(f"{'tokenizer':<10} {'dataset':<18} {'reprotune':>9} {'axolotl':>8} {'same':>6}  expected / unexpected")
    with tempfile.TemporaryDirectory(prefix="reprotune-parity-") as tmp:
        for name in args.tokenizers:
            model_dir = model_folder(name, Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            comparisons = args.datasets + (template_comparisons() if args.templates and name == "builtin" else [])
            for dataset in comparisons:
                work = Path(tmp) / f"{name}-{dataset}"
                work.mkdir()
                ours = reprotune_side(tokenizer, dataset)
                theirs = axolotl_side(axolotl, model_dir, dataset, work)
                kinds, first = Counter(), None
                for a, b in zip(ours, theirs):
                    kind = classify(tokenizer, a, b)
                    kinds[kind] += 1
                    if kind == "unexpected" and first is None:
                        first = first_difference(tokenizer, a, b)
                if len(ours) != len(theirs):
                    kinds["unexpected"] += abs(len(ours) - len(theirs))
                    first = first or f"  sequence counts differ: reprotune {len(ours)}, axolotl {len(theirs)}"
                expected = {k: v for k, v in kinds.items() if k not in ("same", "unexpected")}
                unexpected_total += kinds["unexpected"]
                print(
                    f"{name:<10} {dataset:<18} {len(ours):>9} {len(theirs):>8} {kinds['same']:>6}  "
                    f"{json.dumps(expected)} / {kinds['unexpected']}"
                )
                if first:
                    print("  first unexpected difference:\n" + first)
                if args.write_golden:
                    keep = TEMPLATE_GOLDEN_ROWS if dataset.startswith(TEMPLATE_PREFIX) else GOLDEN_ROWS
                    rows = [{"input_ids": ids, "labels": labels} for ids, labels in theirs[:keep]]
                    golden_path(name, dataset).parent.mkdir(parents=True, exist_ok=True)
                    text = json.dumps({"axolotl": "0.19.0", "rows": rows}, separators=(",", ":"))
                    golden_path(name, dataset).write_text(text.replace('},{"input_ids"', '},\n{"input_ids"') + "\n")
        print(f"unexpected differences: {unexpected_total}")
        renders_differ = template_parity(
            args.axolotl_python,
            model_folder("builtin", Path(tmp) / "render"),
            load_tokenizer("builtin"),
            args.write_golden,
        )
    print(f"named chat templates: {renders_differ} renders differ from Axolotl's")
    return 1 if unexpected_total or renders_differ else 0


if __name__ == "__main__":
    sys.exit(main())

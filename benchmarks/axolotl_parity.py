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
    REPO,
    axolotl_config,
    classify,
    first_difference,
    golden_path,
    model_folder,
    reprotune_side,
)


def axolotl_side(axolotl: Path, model_dir: Path, dataset: str, work: Path) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every row `axolotl preprocess` writes for the dataset, in its order."""
    config = axolotl_config(dataset)
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


def render(tokenizer, messages: list[dict], template: str, generation: bool) -> str:
    """The rendered text, or the template's refusal (both templates must refuse the same conversations)."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
    except jinja2.TemplateError:
        return "<refused>"


def template_parity(axolotl_python: Path, tokenizer) -> int:
    """Render the shipped conversations (and each with a system message, where the template has a system
    role) with reprotune's named templates and with Axolotl's files of the same names; return the number
    of renders that differ."""
    from reprotune.data.rules import KNOWN_ROLE_ALIASES
    from reprotune.model.chat_templates import NAMED_TEMPLATES

    where = "import os, axolotl.utils.chat_templates as m; print(os.path.dirname(m.__file__))"
    folder = Path(subprocess.run([str(axolotl_python), "-c", where], capture_output=True, text=True).stdout.strip())
    lines = (REPO / "data/sample/chat.jsonl").read_text().splitlines()[:200]
    conversations = [
        [{"role": KNOWN_ROLE_ALIASES[m["from"]], "content": m["value"]} for m in json.loads(line)["conversations"]]
        for line in lines
    ]
    differ = 0
    print(f"\n{'template':<12} {'renders':>8} {'equal':>6}")
    for name, ours in NAMED_TEMPLATES.items():
        theirs = (folder / "templates" / f"{name}.jinja").read_text()
        cases = [(c, False) for c in conversations] + [(c[:-1], True) for c in conversations]
        if name not in ("gemma",):  # gemma has no system role
            cases += [([{"role": "system", "content": "Answer briefly."}, *c], False) for c in conversations]
        equal = 0
        for messages, generation in cases:
            rendered = [render(tokenizer, messages, template, generation) for template in (ours, theirs)]
            equal += rendered[0] == rendered[1]
        differ += len(cases) - equal
        print(f"{name:<12} {len(cases):>8} {equal:>6}")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axolotl-python", type=Path, required=True, help="python of the venv Axolotl is in")
    parser.add_argument("--tokenizers", nargs="+", default=["builtin", "llama_spm"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
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
            for dataset in args.datasets:
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
                    rows = [{"input_ids": ids, "labels": labels} for ids, labels in theirs[:GOLDEN_ROWS]]
                    golden_path(name, dataset).parent.mkdir(parents=True, exist_ok=True)
                    text = json.dumps({"axolotl": "0.19.0", "rows": rows}, separators=(",", ":"))
                    golden_path(name, dataset).write_text(text.replace('},{"input_ids"', '},\n{"input_ids"') + "\n")
    print(f"unexpected differences: {unexpected_total}")
    from fixtures.make_tokenize_fixtures import load_tokenizer

    renders_differ = template_parity(args.axolotl_python, load_tokenizer("builtin"))
    print(f"named chat templates: {renders_differ} renders differ from Axolotl's")
    return 1 if unexpected_total or renders_differ else 0


if __name__ == "__main__":
    sys.exit(main())

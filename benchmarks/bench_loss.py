"""Benchmark the loss at supervised positions only (train.chunked_cross_entropy) against the full-logits path,
and batched greedy answers (evaluate.batch_size) against one prompt at a time, each pair in one run.

1. Training throughput: one epoch of the same synthetic chat-like rows (lognormal lengths, mean 200 tokens,
   clipped to 512, packed; the last 10% of each sequence supervised, as SmolLM2's ChatML rows are) on two
   models, chunked on and off, best of 2 each: supervised tokens/s. The built-in model (vocabulary 4,096,
   hidden 256: the head is about a third of a token's FLOPs) and a 20M-parameter Llama with a 32,000-token
   vocabulary (hidden 256: the head is most of the FLOPs, as in small models with large vocabularies).
2. Memory: the built-in architecture with Llama 3's vocabulary (128,256 tokens, random weights), one packed
   2,048-token row, one optimizer step, each path in a fresh process: peak resident set. The full path holds
   [2,048 x 128,256] fp32 logits (1.0 GiB) and their gradient; the target is a peak lower by at least that.
3. Evaluation: the evaluate stage's answers on the built-in model, 64 validation prompts, 32 new tokens,
   evaluate.batch_size 1 (one at a time, as before) against auto (16): seconds, and the answers must be equal.
   SmolLM2's figures come from `make real-model` (README), which runs the whole pipeline.

    python benchmarks/bench_loss.py
"""

from __future__ import annotations

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

from bench_train import params_with, project, train

from reprotune import testing as synthetic
from reprotune.hardware import peak_rss_bytes
from reprotune.model.builtin import build_tiny_llama
from reprotune.packed import IGNORE_INDEX

SUPERVISED_SHARE = 0.1
LLAMA3_VOCAB = 128_256
MEMORY_SEQUENCE_LEN = 2048
TARGET_MEMORY_SAVING = MEMORY_SEQUENCE_LEN * LLAMA3_VOCAB * 4  # one fp32 logits tensor, bytes
EPOCH = {"max_steps": -1, "num_epochs": 1, "save_steps": 10**6, "logging_steps": 10**6, "launcher": "python"}


def chat_like(n: int, vocab: int, max_len: int, mean_len: float = 200.0) -> list[tuple]:
    """Synthetic sequences whose last SUPERVISED_SHARE of tokens is supervised (the answer after a long prompt)."""
    out = []
    for ids, labels in synthetic.sequences(n, seed=0, vocab=vocab, max_len=max_len, mean_len=mean_len):
        labels = ids.copy()
        labels[: int(len(ids) * (1 - SUPERVISED_SHARE))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def build_model(out: Path, vocab: int, layers: int = 4, intermediate: int = 688) -> Path:
    """The built-in architecture (hidden 256) with another vocabulary and random weights; ids only, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MEMORY_SEQUENCE_LEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def throughput(tmp: Path, name: str, base: Path, vocab: int, repeats: int) -> dict:
    seqs = chat_like(160, vocab, 512)
    root = project(tmp / name, base, seqs, 512, packed=True)
    out = {}
    for path, on in (("chunked", True), ("full", False)):
        params = params_with(train={**EPOCH, "chunked_cross_entropy": on})
        runs = [train(params, root) for _ in range(repeats)]  # best of: other work only slows a run down
        out[f"{name}_{path}"] = max(r["supervised_tokens_per_second"] for r in runs)
    out[f"{name}_speedup"] = out[f"{name}_chunked"] / out[f"{name}_full"]
    return out


def memory(tmp: Path) -> dict:
    base = build_model(tmp / "vocab128k", LLAMA3_VOCAB)
    out = {}
    for path in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--memory-child", path, str(base), str(tmp / f"mem-{path}")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{path} child failed:\n{done.stderr[-3000:]}")
        out[f"memory_{path}_peak"] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    out["memory_saving"] = out["memory_full_peak"] - out["memory_chunked_peak"]
    return out


def memory_child(path: str, base: Path, root: Path) -> dict:
    """In a fresh process: one optimizer step on one full 2,048-token row; the peak resident set, in bytes."""
    seqs = chat_like(1, LLAMA3_VOCAB, MEMORY_SEQUENCE_LEN, mean_len=10**6)  # one sequence, clipped to the row
    project(root, base, seqs, MEMORY_SEQUENCE_LEN, packed=True)
    params = params_with(
        train={**EPOCH, "max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
               "chunked_cross_entropy": path == "chunked"},
    )  # fmt: skip
    train(params, root)
    return {"peak": peak_rss_bytes()}


def evaluation(tmp: Path) -> dict:
    import torch

    from reprotune.generate import BATCH_SIZE_AUTO, answers
    from reprotune.loading import load_model

    base = tmp / "tiny-eval"
    build_tiny_llama(base)
    model = load_model(base, torch.float32, False)
    prompts = [list(map(int, ids[: len(ids) // 2])) for ids, _ in chat_like(64, 4096, 256)]
    out, got = {}, {}
    for name, size in (("one_at_a_time", 1), ("batched", BATCH_SIZE_AUTO)):
        start = time.perf_counter()
        got[name] = answers(model, prompts, 32, {1}, size)
        out[f"eval_{name}_s"] = time.perf_counter() - start
    out["eval_speedup"] = out["eval_one_at_a_time_s"] / out["eval_batched_s"]
    out["eval_answers_equal"] = got["one_at_a_time"] == got["batched"]
    return out


def run(repeats: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = tmp / "builtin"
        build_tiny_llama(builtin)
        figures = throughput(tmp, "builtin", builtin, 4096, repeats)
        figures |= throughput(tmp, "llama20m", build_model(tmp / "llama20m", 32_000), 32_000, repeats)
        figures |= memory(tmp)
        figures |= evaluation(tmp)
    figures["pass_memory"] = figures["memory_saving"] >= TARGET_MEMORY_SAVING
    return figures


def main() -> None:
    if sys.argv[1:2] == ["--memory-child"]:
        print(json.dumps(memory_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
        return
    r = run()
    ok = {True: "PASS", False: "FAIL"}
    print(f"training, one epoch of packed rows {SUPERVISED_SHARE:.0%} supervised, supervised tokens/s (best of 2):")
    for name, label in (("builtin", "built-in, vocab 4,096"), ("llama20m", "20M Llama, vocab 32,000")):
        print(
            f"  {label:24}: chunked {r[f'{name}_chunked']:7.0f}, full logits {r[f'{name}_full']:7.0f}, "
            f"{r[f'{name}_speedup']:.2f}x"
        )
    gib = 2**30
    print(f"memory, vocab 128,256, one step of a {MEMORY_SEQUENCE_LEN}-token row (peak resident set):")
    print(f"  chunked {r['memory_chunked_peak'] / gib:.2f} GiB, full logits {r['memory_full_peak'] / gib:.2f} GiB")
    print(
        f"  saving {r['memory_saving'] / gib:.2f} GiB; target >= the logits' {TARGET_MEMORY_SAVING / gib:.2f} GiB "
        f"-> {ok[r['pass_memory']]}"
    )
    print(
        f"evaluation answers, built-in model, 64 prompts x 32 new tokens: one at a time "
        f"{r['eval_one_at_a_time_s']:.1f} s, batched (auto) {r['eval_batched_s']:.1f} s, {r['eval_speedup']:.2f}x; "
        f"answers equal: {r['eval_answers_equal']}"
    )


if __name__ == "__main__":
    main()

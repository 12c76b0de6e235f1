"""Benchmark the merge's memory: peak RSS against the checkpoint's size on disk.

A random ~320M-parameter Llama (hidden 1024, 20 layers, vocab 32000) is written in bf16, sharded
at 200 MB, with a rank-16 LoRA adapter on every linear layer and a val split of 4 random sequences of
256 tokens (what the stage verifies on with the shipped merge.verify_sequences). Each measurement runs
in a fresh subprocess that reports its own peak RSS (VmHWM, which starts afresh at exec), so nothing of
the parent counts:
- idle:     the interpreter with torch, transformers, peft and reprotune imported (the floor);
- stream:   reprotune's streaming merge alone (`merge`: tensors read, merged, written one by one);
- stage:    the merge stage's core (`merge_and_verify`: streaming merge, then the streamed verification);
- naive:    PeftModel.from_pretrained + merge_and_unload + save_pretrained, the usual recipe.
Ratios are peak RSS / size on disk; "above idle" subtracts the import floor. Targets: the streaming
merge under 0.5 x above idle, and the whole stage, import floor included, at most 1.3 x. At 0.64 GB
the floor alone is about 0.7 x (0.44 GB on a CPU-only torch), so a stage that ever holds a whole
model (floor + 1 x) cannot pass.

    python benchmarks/bench_merge.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import torch

from reprotune.io import write_json
from reprotune.tensors import write_safetensors

ARCH = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000)  # fmt: skip
SHARD_BYTES = 200 * 10**6
RANK = 16
VERIFY_SEQUENCES, VERIFY_TOKENS = 4, 256  # the shipped merge.verify_sequences, merge.VERIFY_MAX_TOKENS
TARGET_STREAM_RATIO = 0.5  # streaming merge: peak RSS above idle under half the checkpoint
TARGET_STAGE_RATIO = 1.3  # whole merge stage: the process's peak RSS, import floor included
REPO = Path(__file__).resolve().parents[1]


def shapes(a: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(a["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
        out |= {p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"}
    return out


def write_base(out: Path, seed: int = 0) -> int:
    """Random bf16 Llama checkpoint, sharded like save_pretrained; returns bytes on disk."""
    gen = torch.Generator().manual_seed(seed)
    sh = shapes(ARCH)
    shards, current, used = [], [], 0
    for name, shape in sh.items():
        size = math.prod(shape) * 2
        if current and used + size > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = (
            (torch.ones(sh[n]) if len(sh[n]) == 1 else torch.randn(sh[n], generator=gen) * 0.02).to(torch.bfloat16)
            for n in names
        )
        write_safetensors(out / file, [(n, torch.bfloat16, sh[n]) for n in names], tensors)
        weight_map |= {n: file for n in names}
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "dtype": "bfloat16",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            **ARCH,
        },
    )
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def write_adapter(out: Path, seed: int = 1) -> int:
    """A peft-format rank-16 LoRA adapter on every linear layer but lm_head; returns bytes on disk."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes(ARCH).items():
        if name.startswith("model.layers.") and len(shape) == 2:
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=gen) * 0.01
            tensors[f"{module}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=gen) * 0.01
    from safetensors.torch import save_file

    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": None})  # fmt: skip
    return (out / "adapter_model.safetensors").stat().st_size


def stage_params():
    """The shipped params.yaml with the merge settings of this benchmark."""
    from reprotune.config import load_params

    params = load_params(REPO / "params.yaml")
    return dataclasses.replace(
        params,
        merge=dataclasses.replace(params.merge, dtype="bf16", verify_sequences=VERIFY_SEQUENCES),
        export=dataclasses.replace(params.export, max_shard_size=f"{SHARD_BYTES // 10**6}MB"),
    )


def write_val_split(out: Path, seed: int = 2) -> None:
    """data/packed with a val split of VERIFY_SEQUENCES random sequences of VERIFY_TOKENS tokens: what
    the stage verifies on."""
    import pyarrow as pa

    from reprotune.packed import SCHEMA, write_manifest, write_split

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARCH["vocab_size"], (VERIFY_SEQUENCES, VERIFY_TOKENS), generator=gen).tolist()
    columns = {
        "input_ids": ids,
        "labels": ids,
        "position_ids": [list(range(VERIFY_TOKENS))] * len(ids),
        "seq_lens": [[VERIFY_TOKENS]] * len(ids),
    }
    rows = lambda r0, r1: pa.table({k: v[r0:r1] for k, v in columns.items()}, schema=SCHEMA)  # noqa: E731
    write_split(out, "val", len(ids), rows)
    figures = {
        "files": 1,
        "rows": len(ids),
        "sequences": len(ids),
        "tokens": len(ids) * VERIFY_TOKENS,
        "supervised_tokens": len(ids) * VERIFY_TOKENS,
    }
    write_manifest(out, VERIFY_TOKENS, False, {"val": figures})


def child(mode: str, base: str, adapter: str, packed: str, out: str) -> None:
    """Run one measurement in this (fresh) process and print its figures as JSON."""
    import peft  # noqa: F401  (the import floor is the same in every mode)
    import transformers  # noqa: F401

    from reprotune.hardware import peak_rss_bytes
    from reprotune.merge import MergeInputs, merge, merge_and_verify

    params = stage_params()
    t0 = time.perf_counter()
    result: dict = {}
    if mode == "stream":
        merge(Path(base), Path(adapter), Path(out), torch.bfloat16, SHARD_BYTES)
    elif mode == "stage":
        check = merge_and_verify(params, MergeInputs(Path(base), Path(adapter), Path(packed)), Path(out))
        result = {k: check[k] for k in ("max_abs_diff", "tolerance", "logit_scale", "noise_floor", "verify_tokens")}
    elif mode == "naive":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, max_shard_size="200MB")
    print(json.dumps({**result, "peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - t0}))


def measure(mode: str, work: Path) -> dict:
    out = work / f"out-{mode}"
    out.mkdir()
    paths = [str(work / name) for name in ("base", "adapter", "packed")]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, *paths, str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run() -> dict:
    """Write the checkpoint and adapter, measure every mode; returns a flat dict (bytes, seconds, ratios)."""
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        work = Path(tmp)
        for name in ("base", "adapter", "packed"):
            (work / name).mkdir()
        t0 = time.perf_counter()
        disk, adapter_bytes = write_base(work / "base"), write_adapter(work / "adapter")
        write_val_split(work / "packed")
        figures = {
            "params": sum(math.prod(s) for s in shapes(ARCH).values()),
            "disk_bytes": disk,
            "adapter_bytes": adapter_bytes,
            "write_s": time.perf_counter() - t0,
            "shards": len(list((work / "base").glob("*.safetensors"))),
        }
        for mode in ("idle", "stream", "stage", "naive"):
            r = measure(mode, work)
            figures |= {f"{mode}_peak_rss": r["peak_rss"], f"{mode}_s": r["seconds"]}
            figures |= {f"{mode}_{k}": v for k, v in r.items() if k not in ("peak_rss", "seconds")}
    idle = figures["idle_peak_rss"]
    for mode in ("stream", "stage", "naive"):
        figures[f"{mode}_ratio"] = figures[f"{mode}_peak_rss"] / disk
        figures[f"{mode}_above_idle_ratio"] = (figures[f"{mode}_peak_rss"] - idle) / disk
    figures["idle_ratio"] = idle / disk
    figures["pass_stream"] = figures["stream_above_idle_ratio"] < TARGET_STREAM_RATIO
    figures["pass_stage"] = figures["stage_ratio"] <= TARGET_STAGE_RATIO
    return figures


def main() -> None:
    r = run()
    gb = 1e9
    print(
        f"merge memory benchmark: random Llama, {r['params'] / 1e6:.0f}M params, bf16, "
        f"{r['disk_bytes'] / gb:.2f} GB on disk in {r['shards']} shards; adapter r={RANK}, "
        f"{r['adapter_bytes'] / 1e6:.1f} MB"
    )
    print(f"  idle (imports only)      : peak RSS {r['idle_peak_rss'] / gb:.2f} GB = {r['idle_ratio']:.2f} x disk")
    for mode, label in (
        ("stream", "streaming merge"),
        ("stage", "stage: merge + verify"),
        ("naive", "PeftModel merge_and_unload"),
    ):
        print(
            f"  {label:<25}: peak RSS {r[f'{mode}_peak_rss'] / gb:.2f} GB = {r[f'{mode}_ratio']:.2f} x disk "
            f"({r[f'{mode}_above_idle_ratio']:.2f} x above idle), {r[f'{mode}_s']:.1f} s"
        )
    print(
        f"  bf16 verification: max |logit delta| {r['stage_max_abs_diff']:.3g}, peft's own merge "
        f"{r['stage_noise_floor']:.3g}, tolerance {r['stage_tolerance']:.3g} "
        f"(logit scale {r['stage_logit_scale']:.3g}), on {r['stage_verify_tokens']} tokens"
    )
    print(
        f"target: streaming merge above idle < {TARGET_STREAM_RATIO} x disk -> {'PASS' if r['pass_stream'] else 'FAIL'}"
    )
    print(
        f"target: whole merge stage peak RSS <= {TARGET_STAGE_RATIO} x disk (import floor included) -> "
        f"{'PASS' if r['pass_stage'] else 'FAIL'}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:7])
    else:
        main()

"""GPU check of the train core (not run in CI): CUDA, bf16, a random ~1.1B Llama, packed rows.

What it runs, each training variant in a fresh process so peak memory is its own:
  1. isolation: with the attention training resolves (flash_attention_2 when flash-attn is
     installed, else sdpa per sequence), each sequence's loss inside a packed row must match its
     loss alone (bf16: within 0.02 nats);
  2. QLoRA (NF4 + double quant, bf16 compute) and 16-bit LoRA (bf16 base), 20 optimizer steps of
     2 packed rows x 4 accumulation steps at sequence_len 2048, through reprotune.train.run.train:
     tokens/s, supervised tokens/s, peak torch.cuda.max_memory_allocated, and the memory ratio;
  3. with two or more GPUs: QLoRA on an FSDP-sharded 4-bit base (train.distributed: fsdp, accelerate's FSDP
     plugin, quant storage in bf16), FSDP_STEPS steps over all GPUs: what ran and the base share per process.
The model has TinyLlama's shape (hidden 2048, 22 layers, GQA 32/4 heads, vocab 32000), random
weights, built on the GPU and saved in bf16. Takes ~3-5 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py            # exits 1 with a message when no CUDA device is visible
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from reprotune import testing as synthetic
from reprotune.config import load_params

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = "GPU_CHECK_CHILD"  # the FSDP run's processes, started by accelerate, read their arguments here
FSDP_STEPS = 5
ARCH = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SEQUENCE_LEN = 2048
STEPS = 20
ISOLATION_TOLERANCE = 0.02  # nats; bf16 rounding differs between a packed row and a short one


def build_model(out_dir: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**ARCH), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def write_data(out_dir: Path) -> None:
    # 20 steps x 4 micro-batches x 2 rows of ~2000 tokens: ~330k tokens, ~1700 sequences of mean 200
    seqs = synthetic.sequences(2400, seed=0, vocab=ARCH["vocab_size"], max_len=SEQUENCE_LEN)
    synthetic.write_packed_dir(out_dir, {"train": seqs}, SEQUENCE_LEN, packed=True)


def isolation(model_dir: Path) -> dict:
    """Largest gap between a sequence's mean loss packed with others and alone."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from reprotune.hardware import resolve
    from reprotune.train import attention
    from reprotune.train.batches import collate_padding_free

    caps = resolve("auto", False, "auto")
    attn = attention.effective(caps.attn_implementation, packed=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=attn, device_map={"": "cuda"}
    ).eval()
    seqs = synthetic.sequences(6, seed=1, vocab=ARCH["vocab_size"], max_len=400)
    rows = [{"input_ids": ids, "labels": labels, "seq_lens": np.array([len(ids)])} for ids, labels in seqs]

    def losses(batch: dict, lens: list[int]) -> list[float]:
        batch = {k: v.cuda() for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
        out, start = [], 0
        for n in lens:
            keep = batch["labels"][0, start + 1 : start + n] != -100
            out.append(per_token[start : start + n - 1][keep].mean().item())
            start += n
        return out

    lens = [len(r["input_ids"]) for r in rows]
    alone = [losses(collate_padding_free([r]), [n])[0] for r, n in zip(rows, lens)]
    packed = losses(collate_padding_free(rows), lens)
    return {"attn_implementation": attn, "max_gap": max(abs(a - b) for a, b in zip(alone, packed))}


def child(variant: str, model_dir: Path, data_dir: Path, root: Path) -> dict | None:
    """One training run in this (fresh) process, or one process of the FSDP run; returns the stage's metrics
    (None on the FSDP run's other processes)."""
    from reprotune.stage import execute
    from reprotune.train.run import TrainInputs, train

    (root / "models").mkdir(parents=True)
    (root / "models/base").symlink_to(model_dir)
    (root / "data").mkdir()
    (root / "data/packed").symlink_to(data_dir)
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params,
        quant=dataclasses.replace(params.quant, load_in_4bit=variant in ("qlora", "fsdp-qlora")),
        lora=dataclasses.replace(params.lora, r=16, alpha=32),
        train=dataclasses.replace(
            params.train,
            micro_batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=FSDP_STEPS if variant == "fsdp-qlora" else STEPS,
            distributed="fsdp" if variant == "fsdp-qlora" else "auto",
            learning_rate=2e-4,
            save_steps=10**6,
            logging_steps=5,
            launcher="python",
            loss_watchdog_threshold=None,
        ),
    )
    return execute(train, params, TrainInputs.under(root), out=root / "models/adapter")


def fsdp_qlora(model_dir: Path, data_dir: Path, root: Path, gpus: int) -> dict:
    """QLoRA on an FSDP-sharded 4-bit base over `gpus` processes (accelerate's FSDP plugin), as the stage
    launches it; the main process's metrics."""
    from reprotune.train import launch

    where = launch.Rendezvous(1, 0, "127.0.0.1", launch._free_port())
    env = {**os.environ, CHILD_ENV: json.dumps(["fsdp-qlora", str(model_dir), str(data_dir), str(root)])}
    result = subprocess.run(launch.accelerate_command(gpus, __file__, where), env=env, capture_output=True, text=True)
    if result.returncode:
        print(f"gpu_check: the FSDP QLoRA run failed:\n{result.stderr[-4000:]}", file=sys.stderr)
        sys.exit(1)
    return json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))


def main() -> None:
    if sys.argv[1:2] == ["--child"] or os.environ.get(CHILD_ENV):
        variant, *paths = sys.argv[2:6] if sys.argv[1:2] == ["--child"] else json.loads(os.environ[CHILD_ENV])
        metrics = child(variant, *(Path(a) for a in paths))
        if metrics is not None:
            print(json.dumps(metrics))
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; this check needs an NVIDIA GPU. Nothing was run.", file=sys.stderr)
        sys.exit(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_params = build_model(tmp / "model")
        write_data(tmp / "packed")
        iso = isolation(tmp / "model")
        torch.cuda.empty_cache()
        runs = {}
        for variant in ("qlora", "lora16"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                str(tmp / "model"),
                str(tmp / "packed"),
                str(tmp / variant),
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                print(f"gpu_check: the {variant} run failed:\n{result.stderr[-4000:]}", file=sys.stderr)
                sys.exit(1)
            runs[variant] = json.loads(result.stdout.strip().splitlines()[-1])
        if torch.cuda.device_count() >= 2:
            runs["fsdp-qlora"] = fsdp_qlora(
                tmp / "model", tmp / "packed", tmp / "fsdp-qlora", torch.cuda.device_count()
            )
    report(torch.cuda.get_device_name(), n_params, iso, runs)


def report(device: str, n_params: int, iso: dict, runs: dict) -> None:
    ok = {True: "PASS", False: "FAIL"}
    print(f"gpu_check on {device}: random Llama, {n_params / 1e9:.2f}B params, sequence_len {SEQUENCE_LEN}")
    print(
        f"isolation ({iso['attn_implementation']}): max |packed - alone| loss {iso['max_gap']:.4f} nats; "
        f"tolerance {ISOLATION_TOLERANCE} -> {ok[iso['max_gap'] <= ISOLATION_TOLERANCE]}"
    )
    for variant, label in (("qlora", "QLoRA NF4 base "), ("lora16", "LoRA bf16 base ")):
        m = runs[variant]
        print(
            f"  {label}: {m['tokens_seen'] / m['train_seconds']:9.0f} tokens/s, "
            f"{m['supervised_tokens_per_second']:9.0f} supervised tokens/s, "
            f"peak {m['peak_memory_bytes'] / 2**30:6.2f} GiB "
            f"({m['compute_dtype']}, {m['attn_implementation']}, {m['steps']} steps, loss {m['train_loss']:.3f})"
        )
    ratio = runs["qlora"]["peak_memory_bytes"] / runs["lora16"]["peak_memory_bytes"]
    print(f"  memory ratio QLoRA / LoRA: {ratio:.2f}")
    m = runs.get("fsdp-qlora")
    if m is None:
        print("  FSDP QLoRA: not run (needs two or more CUDA devices)")
        return
    share = m["local_parameter_share"]
    print(
        f"  FSDP QLoRA over {m['world_size']} GPUs: {m['distributed']}, base share held by process 0 {share:.3f}, "
        f"peak {m['peak_memory_bytes'] / 2**30:.2f} GiB, {m['steps']} steps, loss {m['train_loss']:.3f} -> "
        f"{ok[m['distributed'] == 'fsdp' and share < 0.75]}"
    )


if __name__ == "__main__":
    main()

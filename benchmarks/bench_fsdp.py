"""Benchmark FSDP's memory: a LoRA run on a ~290M-parameter full-precision base, one process against FSDP over
two (gloo on CPU: the base sharded while loading by transformers' FSDP2, as the train stage does it).

The base is bench_train's random Llama (hidden 1024, 22 layers, vocab 4096), saved in bf16 and loaded in fp32 as
training on CPU does (1.16 GB of weights; a dtype change makes loading copy them, as on GPUs, where they are
copied to the device: an fp32 file would stay mapped from disk and never count as this process's memory).
Each process runs the train stage's core for 2 optimizer steps of one 128-token row (LoRA r=4 on every
linear layer), and reports, in bytes:
- model: its resident set just after the base is loaded (and sharded) with the adapter, less its resident
  set just before: the model's share of the process;
- peak: its resident-set high-water mark, less the same baseline (the model, a layer's gathered weights,
  activations, the adapter's optimizer state, communication buffers, file pages read while loading).
Large allocations are mmap'd (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the resident set at once.
Target: the model's share of each FSDP process <= 0.6x the one-process figure (the ideal is 0.5x).

    python benchmarks/bench_fsdp.py
"""

from __future__ import annotations

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

from bench_train import MEMORY_LORA_R, MEMORY_SEQUENCE_LEN, build_random_llama, params_with, project

from reprotune import testing as synthetic
from reprotune.hardware import peak_rss_bytes, proc_status_bytes
from reprotune.model.builtin import VOCAB_SIZE
from reprotune.train import launch
from reprotune.train import run as run_module

TARGET = 0.6
ROOT_ENV = "BENCH_FSDP_ROOT"


def child_params(distributed: str):
    return params_with(
        quant={"load_in_4bit": False},
        lora={"r": MEMORY_LORA_R, "alpha": 2 * MEMORY_LORA_R},
        train={
            "distributed": distributed,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps": 2,
            "save_steps": 10**6,
            "gradient_checkpointing": False,
            "launcher": "python",
        },
    )


def child(root: Path) -> None:
    """One process of a run (launched alone or by accelerate): train, write this rank's figures."""
    rank = int(os.environ.get("RANK", "0"))
    figures = {}
    load = run_module.load_trainable

    def load_and_measure(*args, **kwargs):
        figures["before_load"] = proc_status_bytes("VmRSS")
        model = load(*args, **kwargs)
        figures["model"] = proc_status_bytes("VmRSS") - figures["before_load"]
        figures["load_peak"] = peak_rss_bytes() - figures["before_load"]
        return model

    run_module.load_trainable = load_and_measure  # the stage's own code path, with a probe
    distributed = "fsdp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto"
    metrics = run_module.train(child_params(distributed), run_module.TrainInputs.under(root), root / f"adapter-{rank}")
    figures["peak"] = peak_rss_bytes() - figures["before_load"]
    if metrics:
        figures |= {k: metrics[k] for k in ("distributed", "local_parameter_share", "world_size")}
    (root / f"rank{rank}.json").write_text(json.dumps(figures))


def measure(root: Path, processes: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", ROOT_ENV: str(root)}
    if processes == 1:
        cmd = [sys.executable, __file__]
    else:
        where = launch.Rendezvous(1, 0, "127.0.0.1", launch._free_port())
        cmd = launch.accelerate_command(processes, __file__, where)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{processes}-process run failed:\n{result.stderr[-3000:]}")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(processes)]


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "big").mkdir()
        n_params = build_random_llama(tmp / "big")  # bf16 on disk, loaded in fp32 (CPU compute dtype)
        seqs = synthetic.sequences(8, seed=0, vocab=VOCAB_SIZE, max_len=MEMORY_SEQUENCE_LEN, mean_len=10**4)
        out = {"params": n_params}
        for name, processes in (("one", 1), ("fsdp", 2)):
            root = project(tmp / name, tmp / "big", seqs, MEMORY_SEQUENCE_LEN, packed=True)
            out[name] = measure(root, processes)
    one = out["one"][0]
    out["model_ratio"] = max(r["model"] for r in out["fsdp"]) / one["model"]
    out["peak_ratio"] = max(r["peak"] for r in out["fsdp"]) / one["peak"]
    out["pass"] = out["model_ratio"] <= TARGET
    return out


def figures(fig: dict) -> str:
    gib = 2**30
    return (
        f"model {fig['model'] / gib:.2f} GiB, peak {fig['peak'] / gib:.2f} GiB (loading: {fig['load_peak'] / gib:.2f})"
    )


def main() -> None:
    if os.environ.get(ROOT_ENV):
        child(Path(os.environ[ROOT_ENV]))
        return
    r = run()
    one = r["one"][0]
    rows = f"2 steps of one {MEMORY_SEQUENCE_LEN}-token row"
    print(f"LoRA on a {r['params'] / 1e6:.0f}M-parameter Llama (fp32 in memory), {rows}:")
    print(f"  1 process ({one['distributed']}): {figures(one)}")
    for rank, fig in enumerate(r["fsdp"]):
        print(f"  FSDP, process {rank} of 2: {figures(fig)}")
    print(f"  base share held by process 0: {r['fsdp'][0]['local_parameter_share']:.3f}")
    verdict = "PASS" if r["pass"] else "FAIL"
    print(f"  model share per process {r['model_ratio']:.2f}x of one process (peak {r['peak_ratio']:.2f}x); "
          f"target <= {TARGET:g}x -> {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()

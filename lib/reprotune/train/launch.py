"""In-process training or a re-execution of the stage under `accelerate launch` (DDP).

train.launcher:
  python      always train in this process (one device);
  auto        accelerate with one process per GPU when more than one CUDA device is visible, else python;
  accelerate  always accelerate; processes: $REPROTUNE_NUM_PROCESSES if set, else the visible CUDA
              devices (at least 1). On a CPU-only host the processes join over gloo (the Trainer
              runs with use_cpu), which is how the tests run DDP without a GPU.
The re-executed stage sees REPROTUNE_WORKER=1 and trains instead of launching again. Accelerate's
`--cpu` flag is not used: without mpirun it starts a single process; `--multi_gpu` is its
torchrun-based multi-process launcher and works on CPU too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

WORKER_ENV = "REPROTUNE_WORKER"
PROCESSES_ENV = "REPROTUNE_NUM_PROCESSES"


def processes_to_launch(launcher: str) -> int:
    """How many processes to start under accelerate; 0 means train in this process."""
    if launcher == "python" or os.environ.get(WORKER_ENV) == "1":
        return 0
    import torch

    gpus = torch.cuda.device_count()
    if launcher == "auto":
        return gpus if gpus > 1 else 0
    return int(os.environ.get(PROCESSES_ENV) or max(gpus, 1))


def accelerate_command(processes: int, script: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else []),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # the Trainer sets bf16/fp16 from train.bf16 / train.fp16
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        script,
    ]


def relaunch(processes: int, script: str) -> int:
    """Run `script` under accelerate with `processes` processes; returns its exit code."""
    command = accelerate_command(processes, script, _free_port())
    return subprocess.run(command, env={**os.environ, WORKER_ENV: "1"}).returncode


def _free_port() -> int:
    # a fixed port (29500) collides when two pipelines (e.g. queued dvc experiments) share a host
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

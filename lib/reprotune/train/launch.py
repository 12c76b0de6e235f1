"""In-process training or a re-execution of the stage under `accelerate launch` (DDP or FSDP).

train.launcher:
  python      always train in this process (one device, one machine);
  auto        accelerate with one process per GPU when more than one CUDA device is visible or the run
              spans several machines (train.num_machines), else python;
  accelerate  always accelerate; processes per machine: $REPROTUNE_NUM_PROCESSES if set, else the visible
              CUDA devices (at least 1). On a CPU-only host the processes join over gloo (the Trainer
              runs with use_cpu), which is how the tests run DDP and FSDP without a GPU.
Several machines: each runs the stage with its own rank (train.machine_rank, or NODE_RANK); accelerate is given
--num_machines, --machine_rank and the rank-0 machine's address and port (train.main_process_ip /
main_process_port, else MASTER_ADDR / MASTER_PORT from the environment, as torchrun reads them), and
--num_processes counts the processes of all machines. One machine picks a free port itself.
The re-executed stage sees REPROTUNE_WORKER=1 and trains instead of launching again. Accelerate's
`--cpu` flag is not used: without mpirun it starts a single process; `--multi_gpu` is its
torchrun-based multi-process launcher and works on CPU too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from reprotune.config import Params
from reprotune.config.sections import TrainConfig
from reprotune.errors import BadInput
from reprotune.hardware import device_type
from reprotune.train import sharding

# where the machines of a run meet: they do not shape the adapter (left out of its record and fingerprint)
RENDEZVOUS_KEYS = ("machine_rank", "main_process_ip", "main_process_port")
WORKER_ENV = "REPROTUNE_WORKER"
PROCESSES_ENV = "REPROTUNE_NUM_PROCESSES"


def processes_to_launch(cfg: TrainConfig) -> int:
    """How many processes to start on this machine under accelerate; 0 means train in this process."""
    if cfg.launcher == "python" or os.environ.get(WORKER_ENV) == "1":
        return 0
    import torch

    gpus = torch.cuda.device_count()
    if cfg.launcher == "auto" and gpus < 2 and cfg.num_machines == 1:
        return 0
    return int(os.environ.get(PROCESSES_ENV) or max(gpus, 1))


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of all machines meet: the rank-0 machine's address and port."""

    num_machines: int
    machine_rank: int
    ip: str
    port: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Rendezvous:
        ip = cfg.main_process_ip or os.environ.get("MASTER_ADDR")
        port = cfg.main_process_port or int(os.environ.get("MASTER_PORT") or 0)
        if cfg.num_machines == 1:
            return cls(1, 0, ip or "127.0.0.1", port or _free_port())
        rank = cfg.machine_rank if cfg.machine_rank is not None else int(os.environ.get("NODE_RANK") or 0)
        if rank >= cfg.num_machines:
            raise BadInput(f"train.machine_rank: NODE_RANK is {rank}; ranks run from 0 to train.num_machines - 1")
        if not ip or not port:
            raise BadInput(
                f"train.num_machines is {cfg.num_machines}: set train.main_process_ip and train.main_process_port "
                "(or MASTER_ADDR and MASTER_PORT in the environment) to the rank-0 machine's address and a free port"
            )
        return cls(cfg.num_machines, rank, ip, port)


def accelerate_command(processes: int, script: str, where: Rendezvous) -> list[str]:
    """`accelerate launch` of `script` with `processes` on this machine, where.num_machines in all."""
    total = processes * where.num_machines
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if total > 1 else []),
        "--num_processes",
        str(total),
        "--num_machines",
        str(where.num_machines),
        "--machine_rank",
        str(where.machine_rank),
        "--main_process_ip",
        where.ip,
        "--main_process_port",
        str(where.port),
        "--mixed_precision",
        "no",  # the Trainer sets bf16/fp16 from train.bf16 / train.fp16
        "--dynamo_backend",
        "no",
        script,
    ]


def relaunch(processes: int, script: str, params: Params) -> int:
    """Run `script` under accelerate with `processes` processes here; returns its exit code. Settings no
    process could run with are refused first (exit 2): from inside, accelerate would report them as exit 1."""
    where = Rendezvous.of(params.train)
    if sharding.mode(params.train, processes * where.num_machines) == "fsdp":
        sharding.require_shardable(params.quant, params.lora, device_type())
    command = accelerate_command(processes, script, where)
    return subprocess.run(command, env={**os.environ, WORKER_ENV: "1"}).returncode


def _free_port() -> int:
    # a fixed port (29500) collides when two pipelines (e.g. queued dvc experiments) share a host
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

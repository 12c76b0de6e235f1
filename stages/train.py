"""Stage `train`: a LoRA adapter for models/base trained on data/packed (see reprotune.train).

Trains in this process, or re-executes itself under `accelerate launch` (train.launcher). A guard
that stops training (diverging or non-finite loss) exits 1 with its message.
"""

import logging
import sys

from reprotune.layout import ADAPTER, metrics_file
from reprotune.stage import run_stage
from reprotune.train.errors import TrainingStopped
from reprotune.train.launch import processes_to_launch, relaunch
from reprotune.train.run import TrainInputs, train


def launch_or_train(params, inputs: TrainInputs, out_dir):
    """The core, or (train.launcher) its processes under accelerate, which each come back here."""
    processes = processes_to_launch(params.train)
    if processes:
        sys.exit(relaunch(processes, __file__, params))
    return train(params, inputs, out_dir)


def report(m: dict) -> str:
    return (
        f"{m['steps']} steps, train loss {m['train_loss']}, eval loss {m['eval_loss']}, "
        f"{m['supervised_tokens_per_second'] or 0:.0f} supervised tokens/s; adapter in {ADAPTER}"
    )


if __name__ == "__main__":
    try:
        run_stage("train", launch_or_train, TrainInputs(), out=ADAPTER, metrics=metrics_file("train"), report=report)
    except TrainingStopped as e:
        logging.error("%s", e)
        sys.exit(1)

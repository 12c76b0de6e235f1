"""Stage `train`: a LoRA adapter for models/base trained on data/packed (see reprotune.train).

Trains in this process, or re-executes itself under `accelerate launch` (train.launcher). A guard
that stops training (diverging or non-finite loss) exits 1 with its message.
"""

import logging
import sys

from reprotune.config import Params
from reprotune.stage import run_stage
from reprotune.train.errors import TrainingStopped
from reprotune.train.launch import processes_to_launch, relaunch
from reprotune.train.run import ADAPTER, METRICS, train


def main(params: Params) -> None:
    processes = processes_to_launch(params.train.launcher)
    if processes:
        sys.exit(relaunch(processes, __file__))
    try:
        metrics = train(params)
    except TrainingStopped as e:
        logging.error("%s", e)
        sys.exit(1)
    if metrics:  # the main process
        logging.info(
            "%d steps, train loss %s, eval loss %s, %.0f supervised tokens/s; adapter in %s, metrics in %s",
            metrics["steps"],
            metrics["train_loss"],
            metrics["eval_loss"],
            metrics["supervised_tokens_per_second"] or 0,
            ADAPTER,
            METRICS,
        )


if __name__ == "__main__":
    run_stage("train", main)

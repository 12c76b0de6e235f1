"""Trainer callbacks: the loss watchdog, resume-safe counters, checkpoint markers and DVCLive curves.

- `LossWatchdog`: raises TrainingStopped when the logged training loss stays above a threshold for
  `patience` consecutive logs (the logged loss is already averaged over all processes).
- `SupervisedTokens`: tokens that carried a label, summed over processes. Like the watchdog's
  streak it is an ExportableState, saved in every checkpoint's trainer_state.json and restored on
  resume, so counters do not restart from zero after a crash (a known peer bug).
- `CheckpointMarker`: after the Trainer saved `checkpoint-<step>/` (every process done), writes
  the completeness marker (see checkpoints.py), except on the checkpoint of the step training stops at.
- `LogFinalStep`: forces a log at the last step, so the final training loss is always recorded.
- `DvcLiveCurves`: per-step curves (train/loss, train/learning_rate, train/grad_norm, eval/loss)
  into dvclive/plots/metrics/*.tsv and dvclive/metrics.json, indexed by optimizer step. On resume
  the curves are rebuilt from the log history restored from the checkpoint, then continued, so a
  resumed run writes the same curves as an uninterrupted one (DVCLive's own resume would keep the
  rows logged after the checkpoint and before the crash, doubling them).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from reprotune.train.checkpoints import PREFIX, write_marker
from reprotune.train.errors import TrainingStopped

CURVES = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "eval_loss": "eval/loss",
}


class LossWatchdog(TrainerCallback, ExportableState):
    def __init__(self, threshold: float | None, patience: int):
        self.threshold = threshold
        self.patience = patience
        self.streak: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.threshold is None or "loss" not in (logs or {}):
            return
        loss = logs["loss"]
        self.streak = self.streak + [loss] if loss > self.threshold else []
        if len(self.streak) >= self.patience:
            shown = ", ".join(f"{x:.4g}" for x in self.streak)
            raise TrainingStopped(
                f"loss watchdog: training loss stayed above train.loss_watchdog_threshold="
                f"{self.threshold:g} for {self.patience} consecutive logs ({shown}) up to step "
                f"{state.global_step}; training is diverging. Lower train.learning_rate, check the data, "
                f"or raise/disable the threshold."
            )

    def state(self) -> dict:
        return {"args": {"threshold": self.threshold, "patience": self.patience}, "attributes": {"streak": self.streak}}


class SupervisedTokens(TrainerCallback, ExportableState):
    def __init__(self):
        self.seen = 0
        self.at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_start = self.seen  # after a resume: the count restored from the checkpoint

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seen": self.seen}}


class CheckpointMarker(TrainerCallback):
    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # other ranks write their rng_state_<rank>.pth into the same folder
        # a checkpoint written as training stops (its last step, or early stopping's decision) is not one to
        # resume from: the Trainer clears the stop on resume and would train on. A rerun resumes from the one
        # before and, repeating the same steps, comes to the same stop.
        if state.is_world_process_zero and not control.should_training_stop:
            folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            write_marker(folder, self.fingerprint, state.global_step)


class LogFinalStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class DvcLiveCurves(TrainerCallback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from dvclive import Live

            # dvcyaml=False: the curves are declared in the pipeline's dvc.yaml, not a second file
            self.live = Live(str(self.out_dir), save_dvc_exp=False, dvcyaml=False)
            for entry in state.log_history:  # non-empty only when resumed
                self._write(entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None:
            self._write({**(logs or {}), "step": state.global_step})

    def _write(self, entry: dict) -> None:
        curves = {CURVES[k]: v for k, v in entry.items() if k in CURVES}
        if curves:
            self.live.step = entry["step"]
            for name, value in curves.items():
                self.live.log_metric(name, value)
            self.live.make_summary()

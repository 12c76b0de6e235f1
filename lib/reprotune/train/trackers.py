"""Experiment trackers beside DVCLive: W&B, MLflow and TensorBoard through the Trainer's own callbacks.

- `train.report_to` names them; dvclive is always there (DvcLiveCurves writes the stage's declared curves),
  the others are handed to the Trainer, which reports the logged loss, learning rate, gradient norm and
  validation loss to each, with the TrainingArguments and model config as the run's params.
- Names come from params (`wandb_project`, `mlflow_experiment_name`, ...) and, where params leave them
  null, from the variables the trackers read themselves (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...).
  Credentials come only from the environment: no params key holds one, so none reaches dvc.lock,
  metrics, logs or the model card.
- Local files go under trackers/ (outside DVC and git): W&B's run folders (trackers/wandb/, what
  `wandb sync` uploads after an offline run), TensorBoard's events (trackers/tensorboard/) and, when no
  tracking URI is given, MLflow's file store (trackers/mlruns/).
- Each tracker's package is an optional extra (`pip install -e '.[wandb]'`); a missing one stops the stage
  with exit 2 naming the extra, before any model is loaded.

Trade-off: the Trainer's callbacks read their settings from environment variables only, so
`tracker_environment` sets them while the Trainer is made and trains, then restores the previous values
(and finishes the W&B run, which the Trainer leaves open until the process exits).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reprotune.config.sections import TrainConfig
from reprotune.errors import BadInput
from reprotune.io import temporary_env

# tracker -> (the module it needs, the extra that installs it)
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"), "tensorboard": ("tensorboard", "tensorboard")}
# train keys that say where the run is reported, not what it trains: left out of the adapter's
# training_config.json and of the checkpoint fingerprint, so renaming a run retrains nothing downstream
KEYS = (
    "report_to",
    "wandb_project",
    "wandb_entity",
    "wandb_name",
    "wandb_mode",
    "mlflow_tracking_uri",
    "mlflow_experiment_name",
    "mlflow_run_name",
)


def require_trackers(report_to: tuple[str, ...]) -> None:
    """A tracker whose package is missing is a clear error (exit 2) before any model is loaded."""
    for tracker in report_to:
        module, extra = PACKAGES.get(tracker, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise BadInput(
                f"train.report_to: {tracker} needs the {module} package, which is not installed; "
                f"pip install -c constraints.txt -e '.[{extra}]' (or remove {tracker} from train.report_to)"
            )


def trainer_report_to(cfg: TrainConfig) -> list[str]:
    """The Trainer's report_to: every tracker but dvclive (wired in as DvcLiveCurves, resume-safe)."""
    return [t for t in cfg.report_to if t != "dvclive"] or ["none"]


def run_name(cfg: TrainConfig) -> str | None:
    """TrainingArguments.run_name, which both W&B and MLflow take as the run's name."""
    return cfg.wandb_name or cfg.mlflow_run_name


def environment(cfg: TrainConfig, folder: Path) -> dict[str, str]:
    """The variables the Trainer's tracker callbacks read, from params; keys params leave null are absent
    (then the environment's own value, if any, stands)."""
    env: dict[str, str] = {}
    if "wandb" in cfg.report_to:
        env["WANDB_DIR"] = str(folder)  # W&B adds wandb/ under it
        names = {
            "WANDB_PROJECT": cfg.wandb_project,
            "WANDB_ENTITY": cfg.wandb_entity,
            "WANDB_MODE": cfg.wandb_mode,
        }
        env |= {k: v for k, v in names.items() if v is not None}
    if "mlflow" in cfg.report_to:
        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").resolve().as_uri()
        env["MLFLOW_TRACKING_URI"] = uri
        if uri.startswith("file:"):  # MLflow 3 keeps file stores in maintenance mode, refused unless allowed
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        if cfg.mlflow_experiment_name is not None:
            env["MLFLOW_EXPERIMENT_NAME"] = cfg.mlflow_experiment_name
    if "tensorboard" in cfg.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(folder / "tensorboard")
    return env


@contextmanager
def tracker_environment(cfg: TrainConfig, folder: Path) -> Iterator[None]:
    """`environment(cfg, folder)` set for the block, the previous values back afterwards."""
    env = environment(cfg, folder)
    if env:
        folder.mkdir(parents=True, exist_ok=True)
    with temporary_env(env):
        try:
            yield
        finally:
            if "wandb" in cfg.report_to and "wandb" in sys.modules:  # the Trainer leaves its W&B run open
                sys.modules["wandb"].finish()

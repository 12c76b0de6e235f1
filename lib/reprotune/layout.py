"""Where the pipeline keeps its files (relative to the repo root): the paths dvc.yaml names as deps
and outs. Library cores take their input paths as arguments; these are the defaults the stages use."""

from pathlib import Path

LOCAL_MODELS = Path("models/local")
BASE = Path("models/base")
VALIDATED = Path("data/validated")
REPLAY = Path("data/replay")  # the base's own answers, training records (see reprotune.replay)
PACKED = Path("data/packed")
ADAPTER = Path("models/adapter")
MERGED = Path("models/merged")
EXPORT = Path("models/export")
METRICS = Path("metrics")
CHECKPOINTS = Path("checkpoints/train")  # resumable training state, outside DVC (see reprotune.train)
DVCLIVE = Path("dvclive")
TRACKERS = Path("trackers")  # W&B, MLflow and TensorBoard files of train.report_to, outside DVC (see reprotune.train)


def metrics_file(stage: str) -> Path:
    """What the stage produced: hashed into dvc.lock."""
    return METRICS / f"{stage}.json"


def runtime_file(stage: str) -> Path:
    """How the stage ran on this machine (seconds, memory, ...): dvc.yaml's top-level metrics, not locked."""
    return METRICS / "runtime" / f"{stage}.json"

"""Stage `evaluate`: base, as trained (adapter on the 4-bit base) and as shipped (models/merged) on the
validation split -> metrics and samples."""

from reprotune.evaluate import MODELS, SAMPLES, EvaluateInputs, evaluate
from reprotune.layout import METRICS, metrics_file
from reprotune.stage import run_stage


def report(m: dict) -> str:
    names = ("base", "as_trained", "as_shipped")
    return (
        "base -> as trained -> as shipped: "
        f"loss {' -> '.join(str(m[n]['loss']) for n in names)}, "
        f"exact match {' -> '.join(str(m[n]['exact_match']) for n in names)}"
    )


if __name__ == "__main__":
    run_stage(
        "evaluate",
        evaluate,
        EvaluateInputs(),
        files={SAMPLES: METRICS / SAMPLES, MODELS: METRICS / MODELS},
        metrics=metrics_file("evaluate"),
        report=report,
    )

"""Stage `evaluate`: base vs tuned (models/merged) on the validation split -> metrics and samples."""

from reprotune.evaluate import SAMPLES, EvaluateInputs, evaluate
from reprotune.layout import METRICS, metrics_file
from reprotune.stage import run_stage


def report(m: dict) -> str:
    return (
        f"loss {m['base']['loss']} -> {m['tuned']['loss']}, "
        f"exact match {m['base']['exact_match']} -> {m['tuned']['exact_match']}"
    )


if __name__ == "__main__":
    run_stage(
        "evaluate",
        evaluate,
        EvaluateInputs(),
        files={SAMPLES: METRICS / SAMPLES},
        metrics=metrics_file("evaluate"),
        report=report,
    )

"""Stage `validate`: every record of data.datasets kept (normalised) or rejected with a reason."""

from reprotune.data.validate import ValidateInputs, validate
from reprotune.layout import VALIDATED, metrics_file
from reprotune.stage import run_stage


def report(m: dict) -> str:
    return (
        f"read {m['read']} records: kept {m['kept']}, rejected {m['rejected']}, duplicates {m['duplicates']} "
        f"(rejects in {VALIDATED}/rejects.jsonl)"
    )


if __name__ == "__main__":
    run_stage("validate", validate, ValidateInputs(), out=VALIDATED, metrics=metrics_file("validate"), report=report)

"""Stage `base`: resolve base.model into models/base/ (built-in, local folder, or pinned hub commit)."""

from reprotune.layout import BASE
from reprotune.model.base import BaseInputs, resolve_base
from reprotune.stage import run_stage


def report(provenance: dict) -> str:
    return f"base model {provenance['model']} ({provenance['source']}) ready in {BASE}"


if __name__ == "__main__":
    run_stage("base", resolve_base, BaseInputs(), out=BASE, report=report)

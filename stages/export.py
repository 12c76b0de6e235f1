"""Stage `export`: models/export/, the deployable folder (weights, tokenizer, card, manifest, GGUF).

The last stage: its report line sums up the run (base vs the shipped model on the validation split).
"""

from reprotune.export.bundle import ExportInputs, build_export
from reprotune.layout import EXPORT
from reprotune.stage import run_stage


def report(summary: dict) -> str:
    ev = summary["evaluate"]
    if not ev:
        return f"exported {EXPORT}: {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB"
    base, tuned = ev.get("base", {}), ev.get("as_shipped", {})
    kept = ev.get("retention")
    retention = (
        f"; retention on {kept['prompts']} general prompts: NLL of the base's answers {kept['base']['nll']} -> "
        f"{kept['as_shipped']['nll']}, answers begin as the base's {kept['base']['begins_as_base_count']} -> "
        f"{kept['as_shipped']['begins_as_base_count']}"
        if kept
        else ""
    )
    return (
        f"done. base -> tuned on the validation split: loss {base.get('loss')} -> {tuned.get('loss')}, "
        f"exact match {base.get('exact_match_count')} -> {tuned.get('exact_match_count')} of "
        f"{tuned.get('generated')}{retention}; model in {EXPORT}/ ({summary['files']} files, "
        f"{summary['bytes'] / 1e6:.1f} MB, {', '.join(summary['formats'])})"
    )


if __name__ == "__main__":
    run_stage("export", build_export, ExportInputs(), out=EXPORT, report=report)

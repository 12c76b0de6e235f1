"""Stage `merge`: models/base + models/adapter -> models/merged, verified against base+adapter logits."""

from reprotune.layout import MERGED, metrics_file
from reprotune.merge import MergeInputs, merge_and_verify
from reprotune.stage import run_stage


def report(m: dict) -> str:
    return f"wrote {MERGED} ({m['shards']} shards, {m['dtype']}); max |logit delta| {m['max_abs_diff']:.3g}"


if __name__ == "__main__":
    # a failed verification raises inside the doorway: no models/merged, no metrics
    run_stage("merge", merge_and_verify, MergeInputs(), out=MERGED, metrics=metrics_file("merge"), report=report)

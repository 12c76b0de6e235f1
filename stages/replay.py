"""Stage `replay`: the base model's own answers to data.replay's prompts -> data/replay/ (training records)."""

from reprotune.layout import REPLAY, metrics_file
from reprotune.replay import ReplayInputs, replay
from reprotune.stage import run_stage


def report(m: dict) -> str:
    if not m["prompts"]:
        return "replay: off (data.replay.source: none)"
    return (
        f"replay ({m['source']}): {m['records']} of the base's answers to {m['prompts']} prompts kept, "
        f"{m['cut']} of them cut at max_new_tokens ({m['dropped_empty']} empty answers dropped)"
    )


if __name__ == "__main__":
    run_stage("replay", replay, ReplayInputs(), out=REPLAY, metrics=metrics_file("replay"), report=report)

"""The CI workflows' own `run:` steps, executed in order by tests/actions.py against a local origin (a bare
git repo) and a local directory as the DVC remote, on the built-in model with a 2-step training.

retrain.yml, as one repository's history:
  (a) first push, no DVC remote: trains, reports, one notice; pull and push skipped; dvc.lock committed back
      with the run's timings (metrics/runtime/);
  (b) the user adds a remote: everything trains again (nothing was cached) and is pushed with the run cache;
      every output is reproduced, so dvc.lock is byte-identical and the commit step commits nothing;
  (c) a second runner at the same commit: no stage runs, every output restored byte for byte;
  (d) a commit that changes one data file: exactly validate and the stages after it run.
sweep.yml: two experiments, each on its own "runner" (a fresh clone), gathered into one table.
Each scenario is a module fixture built on the previous one; the summaries are printed (pytest -s shows them).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from actions import Runner
from conftest import REPO, copy_repo, output_hashes, shorten_training

DVC = Path(sys.executable).parent / "dvc"
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
AFTER_VALIDATE = STAGES[STAGES.index("validate") :]


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=user", "-c", "user.email=user@example.com", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def stages_run(log: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", log)


class History:
    """The repository as its user sees it: a working clone that commits and pushes to the bare origin."""

    def __init__(self, root: Path):
        seed = copy_repo(root / "seed")
        git(seed, "branch", "-M", "main")
        shorten_training(seed)
        git(seed, "commit", "-qam", "params: a 2-step training for the workflow tests")
        self.origin = root / "origin.git"
        git(root, "clone", "-q", "--bare", str(seed), str(self.origin))
        self.user = root / "user"
        git(root, "clone", "-q", str(self.origin), str(self.user))
        self.dvc_remote = root / "dvc-remote"
        self.retrain = Runner(REPO / ".github/workflows/retrain.yml", self.origin, root / "runners")
        self.sweep = Runner(REPO / ".github/workflows/sweep.yml", self.origin, root / "runners")
        (root / "runners").mkdir()
        self.runs: dict[str, dict] = {}

    def head(self) -> str:
        return git(self.origin, "rev-parse", "main")

    def push(self, message: str, change) -> dict:
        """Commit `change(user clone)` and push it; returns the push event GitHub would send."""
        git(self.user, "pull", "-q", "--ff-only")
        before = git(self.user, "rev-parse", "HEAD")
        change(self.user)
        git(self.user, "add", "-A")
        git(self.user, "commit", "-qm", message)
        git(self.user, "push", "-q", "origin", "main")
        return {"before": before, "after": self.head()}


def timings(stages: list[str]) -> set[str]:
    return {f"metrics/runtime/{stage}.json" for stage in stages}


def committed_a_lock_and_timings(history: History, since: str, stages: list[str]) -> bool:
    """The commit back holds the new dvc.lock and the timings of the stages that ran (a stage as quick as
    export may take the same milliseconds twice, so not every one need differ)."""
    changed = set(git(history.origin, "diff", "--name-only", f"{since}..main").splitlines())
    return {"dvc.lock", "metrics/runtime/train.json"} <= changed <= {"dvc.lock", *timings(stages)}


def assert_steps(job, skipped: set[str] = frozenset()):
    for step in job.steps:
        expected = "skipped" if step.name in skipped else "success"
        assert step.outcome == expected, f"step {step.name!r}: {step.outcome}\n{step.log[-3000:]}"


def show(title: str, job) -> None:
    print(f"\n===== {title}: job summary =====\n{job.summary}")


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    return History(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def first_push(history):
    """(a) The first push of a fresh clone's configuration: no DVC remote."""
    history.initial = history.head()
    event = {"before": git(history.origin, "rev-parse", "main~1"), "after": history.initial}
    job = history.retrain.run("push", event)["retrain"][0]
    show("retrain (a) no remote", job)
    return job


@pytest.fixture(scope="module")
def remote_added(history, first_push):
    """(b) The user adds a DVC remote and pushes that."""
    event = history.push(
        "DVC remote",
        lambda repo: subprocess.run(
            [str(DVC), "remote", "add", "-d", "storage", str(history.dvc_remote)], cwd=repo, check=True
        ),
    )
    job = history.retrain.run("push", event)["retrain"][0]
    show("retrain (b) first run with a remote", job)
    return job, event


@pytest.fixture(scope="module")
def second_runner(history, remote_added):
    """(c) The workflow dispatched again at the same commit: a fresh runner, same remote."""
    job = history.retrain.run("workflow_dispatch", {})["retrain"][0]
    show("retrain (c) second runner, same commit", job)
    return job


@pytest.fixture(scope="module")
def data_changed(history, second_runner):
    """(d) A commit that changes one data file (one conversation fewer)."""

    def drop_last_conversation(repo: Path):
        path = repo / "data/sample/chat.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))

    event = history.push("data: one conversation fewer", drop_last_conversation)
    job = history.retrain.run("push", event)["retrain"][0]
    show("retrain (d) one data file changed", job)
    return job, event


def test_a_no_remote_trains_reports_and_says_how_to_add_one(history, first_push):
    job = first_push
    assert_steps(job, skipped={"Pull data and run cache", "Push results and run cache"})
    notices = [line for line in job.step("DVC remote").log.splitlines() if line.startswith("::notice")]
    assert len(notices) == 1 and "dvc remote add -d storage" in notices[0], job.step("DVC remote").log
    assert stages_run(job.step("Reproduce").log) == STAGES
    assert "## Metrics" in job.summary and "## Params" in job.summary
    assert re.search(r"\| metrics/evaluate\.json\s*\| as_shipped\.loss", job.summary), job.summary
    # The lock went back to the branch, marked so that it does not retrigger the workflow.
    assert history.head() != history.initial
    assert "[skip ci]" in git(history.origin, "log", "-1", "--format=%s", "main")
    assert committed_a_lock_and_timings(history, history.initial, STAGES)


def test_b_with_a_remote_everything_trains_and_is_pushed(history, remote_added):
    job, event = remote_added
    assert_steps(job)
    assert stages_run(job.step("Reproduce").log) == STAGES
    cached = {path.name for path in (history.dvc_remote / "files/md5").glob("*/*")}
    assert len(cached) > 20, "outputs were not pushed"
    assert list((history.dvc_remote / "runs").glob("*/*/*")), "the run cache was not pushed"
    # Same data and params as (a) on another runner: every output reproduced, so the same dvc.lock (timings
    # and memory live apart from it) and nothing to commit.
    assert git(job.workspace, "diff", "--stat", "HEAD", "--", "dvc.lock") == ""
    assert "dvc.lock unchanged: every output reproduced, nothing to commit" in job.step("Commit dvc.lock").log
    assert history.head() == event["after"]
    assert git(job.workspace, "diff", "--name-only", "HEAD", "--", "metrics/runtime")  # this run's timings differ


def test_c_a_second_runner_restores_everything_and_runs_nothing(history, remote_added, second_runner):
    job = second_runner
    assert_steps(job, skipped={"Commit dvc.lock"})  # not a push
    assert stages_run(job.step("Reproduce").log) == []
    assert output_hashes(job.workspace) == output_hashes(remote_added[0].workspace)


def test_d_a_data_change_reruns_exactly_validate_and_after(history, data_changed):
    job, event = data_changed
    assert_steps(job)
    assert stages_run(job.step("Reproduce").log) == AFTER_VALIDATE
    assert "Stage 'base' didn't change" in job.step("Reproduce").log
    assert re.search(r"\| metrics/validate\.json\s*\| read\s*\| 3000\s*\| 2999", job.summary), job.summary
    assert history.head() != event["after"]  # the new lock, committed back
    assert committed_a_lock_and_timings(history, event["after"], AFTER_VALIDATE)


def test_sweep_runs_each_experiment_on_its_own_runner_and_gathers_one_table(history, data_changed):
    jobs = history.sweep.run("workflow_dispatch", {}, inputs={"experiments": "lora.r=4, lora.r=8"})
    assert jobs["plan"][0].outputs["experiments"] == json.dumps(["lora.r=4", "lora.r=8"])
    assert len(jobs["run"]) == 2 and len({job.workspace for job in jobs["run"]}) == 2
    for job in jobs["run"]:
        assert_steps(job)
        log = job.step("Run the experiment").log
        assert stages_run(log) == STAGES[STAGES.index("train") :], log  # shared stages restored
    compare = jobs["compare"][0]
    assert_steps(compare)
    show("sweep", compare)
    table = [line for line in compare.summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert "lora.r" in header and "as_shipped.loss" in header, compare.summary
    ranks = sorted(row.split("|")[header.index("lora.r") + 1].strip() for row in table[2:])
    assert ranks[:2] == ["4", "8"] or {"4", "8"} <= set(ranks), compare.summary


def test_sweep_refuses_a_malformed_override_before_any_runner_starts(history, data_changed):
    jobs = history.sweep.run("workflow_dispatch", {}, inputs={"experiments": "lora.r 8"})
    assert jobs["plan"][0].steps[0].outcome == "failure"
    assert "not a params override" in jobs["plan"][0].steps[0].log
    assert jobs["run"] == [] and jobs["compare"] == []

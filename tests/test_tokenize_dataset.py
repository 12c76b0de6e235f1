"""The tokenize stage's core: split, packing invariants, determinism, length policy and metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprotune import packed
from reprotune.io import sha256_tree
from reprotune.packed import IGNORE_INDEX
from reprotune.records import SCHEMA as RECORDS_SCHEMA
from reprotune.tokenize import dataset
from reprotune.tokenize.dataset import tokenize_dataset
from reprotune.tokenize.templates import PromptEncoder, TokenizeError

from fixtures import make_tokenize_fixtures as fx

WORDS = fx.LONG_TEXT.replace(",", "").replace(".", "").split()
CFG = dataclasses.replace(fx.BASE_CFG, sequence_len=48, val_set_size=0.1, seed=3, batch_size=16)


@pytest.fixture(scope="module")
def tok():
    return fx.load_tokenizer("builtin")


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca, chat and completion records of long-tailed lengths (a few over 48 tokens)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.lognormal(2.0, 0.8)) + 1  # words: mostly 3-20, a tail past 40
        kind = ("alpaca", "chat", "completion")[i % 3]
        if kind == "alpaca":
            out.append(fx.alpaca(words(rng, 3), words(rng, size), input_=words(rng, 2) if i % 2 else "", line=i + 1))
        elif kind == "chat":
            out.append(
                fx.chat(
                    ("user", words(rng, 4)),
                    ("assistant", words(rng, size)),
                    ("user", words(rng, 2)),
                    ("assistant", words(rng, 3)),
                    line=i + 1,
                )
            )
        else:
            out.append(fx.completion(words(rng, 2 * size), line=i + 1))
    return out


def write_records(path: Path, records: list[dict]) -> Path:
    rows = [{"id": f"{i:032x}", **r} for i, r in enumerate(records)]
    pq.write_table(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def records_path(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("records") / "records.parquet", make_records(90))


def run(tok, records_path, out: Path, **changes) -> dict:
    out.mkdir()
    return tokenize_dataset(records_path, tok, dataclasses.replace(CFG, **changes), out)


def read_split(out: Path, name: str) -> list[dict]:
    files = sorted((out / name).glob("*.parquet")) if (out / name).exists() else []
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def sequences_of(rows: list[dict]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input_ids, labels) of every sequence in the rows, in row order."""
    out = []
    for row in rows:
        s = 0
        for n in row["seq_lens"]:
            out.append((tuple(row["input_ids"][s : s + n]), tuple(row["labels"][s : s + n])))
            s += n
    return out


def check_rows(rows: list[dict], sequence_len: int, packed: bool) -> None:
    for row in rows:
        n = len(row["input_ids"])
        assert sum(row["seq_lens"]) == n == len(row["labels"]) == len(row["position_ids"]) <= sequence_len
        assert row["position_ids"] == [p for k in row["seq_lens"] for p in range(k)]  # restart per sequence
        assert packed or len(row["seq_lens"]) == 1


# ----------------------------------------------------------------------------- split


@pytest.mark.parametrize(("val_set_size", "n_val"), [(0, 0), (0.1, 9), (0.05, 5), (7, 7)])
def test_split_sizes(tok, records_path, tmp_path, val_set_size, n_val):
    m = run(tok, records_path, tmp_path / "out", val_set_size=val_set_size)
    assert (m["splits"]["val"]["records"], m["splits"]["train"]["records"]) == (n_val, 90 - n_val)
    assert (tmp_path / "out" / "val").exists() == (n_val > 0)


def test_split_is_by_record_and_seeded():
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    a, b = dataset.split_records(1000, 0.2, rng()), dataset.split_records(1000, 0.2, rng())
    assert a.sum() == 200 and (a == b).all()
    assert not (a == dataset.split_records(1000, 0.2, np.random.default_rng(6))).all()
    with pytest.raises(TokenizeError, match="leaves no training record"):
        dataset.split_records(10, 10, rng())


# ----------------------------------------------------------------------------- rows


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 1000),
    sequence_len=st.sampled_from([16, 32, 64, 256]),
    packing=st.booleans(),
    excess=st.sampled_from(["drop", "truncate"]),
    val=st.sampled_from([0, 0.2, 2]),
)
def test_rows_hold_every_kept_sequence_once(tok, tmp_path_factory, n, seed, sequence_len, packing, excess, val):
    records = make_records(n, seed)
    if val >= 1 and n <= val:
        val = 0
    cfg = dataclasses.replace(
        CFG, sequence_len=sequence_len, sample_packing=packing, excess_length=excess, val_set_size=val, seed=seed
    )
    expected = PromptEncoder(tok, cfg).encode(records).sequences
    tmp = tmp_path_factory.mktemp("prop")
    path = write_records(tmp / "records.parquet", records)
    try:
        m = tokenize_dataset(path, tok, cfg, tmp)
    except TokenizeError as e:  # nothing kept, or all of it in val: refused, nothing to train on
        assert "no training" in str(e)
        return
    rows = read_split(tmp, "train") + read_split(tmp, "val")
    check_rows(rows, sequence_len, packing)
    got = sequences_of(rows)
    assert Counter(got) == Counter((tuple(s.input_ids), tuple(s.labels())) for s in expected)
    assert m["sequences"] == len(expected) and m["bins"] == len(rows)


def test_unpacked_rows_hold_one_sequence(tok, records_path, tmp_path):
    m = run(tok, records_path, tmp_path / "out", sample_packing=False)
    rows = read_split(tmp_path / "out", "train")
    check_rows(rows, CFG.sequence_len, packed=False)
    assert m["splits"]["train"]["rows"] == m["splits"]["train"]["sequences"] == len(rows)


def test_shards_and_row_groups(tok, records_path, tmp_path, monkeypatch):
    run(tok, records_path, tmp_path / "one")
    monkeypatch.setattr(packed, "SHARD_ROWS", 5)
    monkeypatch.setattr(packed, "ROW_GROUP_ROWS", 2)
    run(tok, records_path, tmp_path / "many")
    files = sorted((tmp_path / "many" / "train").glob("*.parquet"))
    assert len(files) > 2 and all(pq.ParquetFile(f).metadata.num_rows <= 5 for f in files)
    assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows <= 2 for f in files)
    assert read_split(tmp_path / "many", "train") == read_split(tmp_path / "one", "train")


# ----------------------------------------------------------------------------- determinism


def test_byte_identical_for_any_num_proc_and_batch_size(tok, records_path, tmp_path):
    runs_ = [
        run(tok, records_path, tmp_path / "a"),
        run(tok, records_path, tmp_path / "b"),
        run(tok, records_path, tmp_path / "c", num_proc=2, batch_size=7),
    ]
    hashes = [sha256_tree(tmp_path / d) for d in "abc"]
    assert set(hashes[0]) == {"manifest.json", "train/part-00000.parquet", "val/part-00000.parquet"}
    assert hashes[0] == hashes[1] == hashes[2]
    assert len({tuple(sorted((k, str(v)) for k, v in r.items() if k != "seconds")) for r in runs_}) == 1


def test_seed_changes_split_and_order(tok, records_path, tmp_path):
    run(tok, records_path, tmp_path / "a")
    run(tok, records_path, tmp_path / "b", seed=4)
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "b")


# ----------------------------------------------------------------------------- length policy, metrics


def test_excess_length_modes(tok, records_path, tmp_path):
    drop = run(tok, records_path, tmp_path / "drop")
    cut = run(tok, records_path, tmp_path / "cut", excess_length="truncate")
    assert drop["dropped_too_long"] > 0 and drop["truncated"] == 0
    assert cut["dropped_too_long"] == 0 and cut["truncated"] == drop["dropped_too_long"]
    kept_or_empty = [r["sequences"] + r["dropped_no_trainable"] for r in (drop, cut)]
    assert kept_or_empty[1] == kept_or_empty[0] + cut["truncated"]
    with pytest.raises(TokenizeError, match=r"fixtures.jsonl:\d+: \d+ tokens, over tokenize.sequence_len 48"):
        run(tok, records_path, tmp_path / "error", excess_length="error")


def test_metrics_match_the_files(tok, records_path, tmp_path):
    out = tmp_path / "out"
    m = run(tok, records_path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sequence_len"] == 48 and manifest["packed"] is True
    total_tokens = 0
    for name in ("train", "val"):
        rows = read_split(out, name)
        seqs = sequences_of(rows)
        tokens = sum(len(ids) for ids, _ in seqs)
        figures = {
            "rows": len(rows),
            "sequences": len(seqs),
            "tokens": tokens,
            "supervised_tokens": sum(sum(lab != IGNORE_INDEX for lab in labels) for _, labels in seqs),
        }
        assert {k: m["splits"][name][k] for k in figures} == figures
        assert manifest["splits"][name] == {**figures, "files": [f"{name}/part-00000.parquet"]}
        total_tokens += tokens
    assert m["tokens"] == total_tokens and m["lower_bound_bins"] == math.ceil(total_tokens / 48)
    assert m["packing_efficiency"] == pytest.approx(total_tokens / (m["bins"] * 48))
    assert m["bins"] >= m["lower_bound_bins"] and m["packing_efficiency"] > 0.8
    assert m["records"] == 90

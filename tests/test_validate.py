"""validate: every record kept or rejected with a reason, counts balance, outputs deterministic."""

import json
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reprotune.config.check import fill_defaults, schema
from reprotune.config.sections import build_params
from reprotune.data.readers import DataError
from reprotune.data.validate import ValidateInputs, validate
from reprotune.io import sha256_tree


def data_config(*datasets: dict, on_invalid="reject", dedup=True):
    """Params with these data settings and every other key at its default."""
    filled = fill_defaults({"data": {"datasets": list(datasets), "on_invalid": on_invalid, "dedup": dedup}}, schema())
    return build_params(filled)


def run(tmp_path: Path, cfg) -> tuple[dict, list[dict], list[dict]]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    metrics = validate(cfg, ValidateInputs(tmp_path), out)
    rows = pq.read_table(out / "records.parquet").to_pylist()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return metrics, rows, rejects


# One line per kind of bad record, each with the reason it must get.
BAD_ALPACA = [
    ('["not", "an", "object"]', "not_an_object"),
    ('{"input": "x", "output": "y"}', "missing_field"),
    ('{"instruction": "x"}', "missing_field"),
    ('{"instruction": 5, "output": "y"}', "not_a_string"),
    ('{"instruction": "x", "output": "   "}', "empty"),
    ('{"instruction": "x", "input": ["a"], "output": "y"}', "not_a_string"),
    ('{"instruction": "x", "output": "y"', "invalid_json"),
    ("not json at all", "invalid_json"),
]
BAD_CHAT = [
    ('{"conversations": []}', "bad_messages"),
    ('{"conversations": "hi"}', "bad_messages"),
    ('{"other": []}', "missing_field"),
    ('{"conversations": ["hi"]}', "bad_messages"),
    ('{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}', "unknown_role"),
    ('{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]}', "not_a_string"),
    ('{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}]}', "empty"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', "no_trainable_turn"),
    (
        '{"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "s"}, '
        '{"from": "gpt", "value": "y"}]}',
        "misplaced_system",
    ),
]
GOOD_ALPACA = [
    '{"instruction": "Add 2 and 3.", "input": "", "output": "5"}',
    '{"instruction": "Reverse:", "input": "a b", "output": "b a", "extra": 1}',
]
GOOD_CHAT = [
    '{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, '
    '{"from": "gpt", "value": "Hello"}]}',
    '{"conversations": [{"from": "HUMAN", "value": "1+1?"}, {"from": "model", "value": "2"}]}',
]
SHAREGPT = {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"}}


def test_mixed_file_keeps_every_good_rejects_every_bad(tmp_path):
    lines = [GOOD_ALPACA[0]] + [bad for bad, _ in BAD_ALPACA] + ["", "   "] + [GOOD_ALPACA[1]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    metrics, rows, rejects = run(tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}))
    assert [r["line"] for r in rows] == [1, len(lines)]
    assert [r["reason"] for r in rejects] == [reason for _, reason in BAD_ALPACA]
    assert [r["line"] for r in rejects] == list(range(2, 2 + len(BAD_ALPACA)))
    assert all(r["source"] == "a.jsonl" and r["detail"] for r in rejects)
    assert metrics["read"] == len(GOOD_ALPACA) + len(BAD_ALPACA)  # blank lines are not records
    assert metrics["read"] == metrics["kept"] + metrics["rejected"] + metrics["duplicates"]
    assert sum(metrics["rejected_by_reason"].values()) == metrics["rejected"] == len(BAD_ALPACA)


def test_chat_rules_and_role_aliases(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(GOOD_CHAT + [bad for bad, _ in BAD_CHAT]) + "\n")
    metrics, rows, rejects = run(tmp_path, data_config({"path": "c.jsonl", "type": "chat", **SHAREGPT}))
    assert [r["reason"] for r in rejects] == [reason for _, reason in BAD_CHAT]
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]
    assert metrics["kept"] == 2


def test_chat_template_is_chat_and_drop_system_message_drops_it(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(GOOD_CHAT) + "\n")
    _, as_chat, _ = run(tmp_path, data_config({"path": "c.jsonl", "type": "chat", **SHAREGPT}))
    _, as_template, _ = run(tmp_path, data_config({"path": "c.jsonl", "type": "chat_template", **SHAREGPT}))
    assert as_template == as_chat and {r["type"] for r in as_template} == {"chat"}
    _, dropped, _ = run(
        tmp_path, data_config({"path": "c.jsonl", "type": "chat_template", "drop_system_message": True, **SHAREGPT})
    )
    assert [m["role"] for m in dropped[0]["messages"]] == ["user", "assistant"]
    assert dropped[1]["messages"] == as_chat[1]["messages"]  # no system message: unchanged


def test_a_misplaced_system_message_is_numbered_as_in_the_record(tmp_path):
    roles = ["system", "human", "system", "gpt"]
    line = json.dumps({"conversations": [{"from": r, "value": "x"} for r in roles]})
    good = json.dumps({"conversations": [{"from": r, "value": "x"} for r in ("human", "gpt")]})
    (tmp_path / "c.jsonl").write_text(line + "\n" + good + "\n")  # a file of rejects only stops validate
    ds = {"path": "c.jsonl", "type": "chat_template", "drop_system_message": True, **SHAREGPT}
    _, _, rejects = run(tmp_path, data_config(ds))
    assert rejects[0]["detail"] == "message 3: a system message may only come first"


def test_custom_role_aliases(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        '{"messages": [{"role": "customer", "content": "x"}, {"role": "agent", "content": "y"}]}\n'
    )
    cfg = data_config({"path": "c.jsonl", "type": "chat", "roles": {"user": ["customer"], "assistant": ["agent"]}})
    _, rows, _ = run(tmp_path, cfg)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]


def test_field_mapping_and_completion(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": "Say hi", "a": "hi"}\n')
    (tmp_path / "t.jsonl").write_text('{"body": "Once upon a time."}\n{"body": ""}\n')
    cfg = data_config(
        {"path": "a.jsonl", "type": "alpaca", "field_instruction": "q", "field_output": "a"},
        {"path": "t.jsonl", "type": "completion", "field_text": "body"},
    )
    metrics, rows, rejects = run(tmp_path, cfg)
    assert rows[0]["instruction"] == "Say hi" and rows[0]["input"] == "" and rows[0]["output"] == "hi"
    assert rows[1]["text"] == "Once upon a time." and rows[1]["type"] == "completion"
    assert rejects[0]["reason"] == "empty" and rejects[0]["source"] == "t.jsonl"
    assert metrics["per_source"]["t.jsonl"] == {
        "read": 2,
        "kept": 1,
        "rejected": 1,
        "duplicates": 0,
        "rejected_by_reason": {"empty": 1},
    }


def test_bom_crlf_and_non_utf8(tmp_path):
    body = (
        b'\xef\xbb\xbf{"instruction": "a\\r\\nb", "output": "c"}\r\n\r\n'
        b'{"instruction": "caf\xe9", "output": "x"}\r\n{"instruction": "d", "output": "e"}\r\n'
    )
    (tmp_path / "a.jsonl").write_bytes(body)
    metrics, rows, rejects = run(tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}))
    assert rows[0]["instruction"] == "a\nb"  # CRLF inside text normalised
    assert [r["line"] for r in rows] == [1, 4]
    assert rejects[0]["reason"] == "invalid_utf8" and rejects[0]["line"] == 3 and "\\xe9" in rejects[0]["raw"]
    assert metrics["read"] == 3


def test_unicode_is_nfc_normalised(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "cafe\u0301", "output": "x"}) + "\n")
    _, rows, _ = run(tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}))
    assert rows[0]["instruction"] == "caf\u00e9"


def test_duplicates_dropped_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join([GOOD_ALPACA[0], GOOD_ALPACA[0].replace('"5"', '"5"  '), GOOD_ALPACA[1]]) + "\n"
    )
    (tmp_path / "b.jsonl").write_text(GOOD_ALPACA[1] + "\n")
    metrics, rows, _ = run(
        tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}, {"path": "b.jsonl", "type": "alpaca"})
    )
    assert metrics["duplicates"] == 2 and metrics["kept"] == 2 and metrics["read"] == 4
    dups = [json.loads(x) for x in (tmp_path / "out/duplicates.jsonl").read_text().splitlines()]
    assert dups == [
        {"source": "a.jsonl", "line": 2, "duplicate_of": "a.jsonl:1"},
        {"source": "b.jsonl", "line": 1, "duplicate_of": "a.jsonl:3"},
    ]
    metrics, rows, _ = run(tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}, dedup=False))
    assert metrics["duplicates"] == 0 and metrics["kept"] == 3


def test_on_invalid_error_stops_with_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(GOOD_ALPACA[0] + "\n" + '{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: missing field 'output'"):
        run(tmp_path, data_config({"path": "a.jsonl", "type": "alpaca"}, on_invalid="error"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("e.jsonl", b"", "file is empty"),
        ("b.jsonl", b"\n\n  \n", "only blank lines"),
        ("n.jsonl", b"hello\nworld\n", "not JSON Lines"),
        ("e.json", b"  ", "file is empty"),
        ("n.json", b"{broken", "not valid JSON"),
        ("o.json", b'{"instruction": "x"}', "expected a JSON array"),
        ("x.parquet", b"PAR1 not really", "not a Parquet file"),
        ("x.csv", b"instruction,output\ncaf\xe9,x\n", "not valid UTF-8"),
    ],
)
def test_unusable_files_get_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, data_config({"path": name, "type": "alpaca"}))


def test_json_parquet_csv_readers(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": ""}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_bytes(b'\xef\xbb\xbfinstruction,input,output\r\na,,b\r\n"c\r\nmore",d,\r\n')
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in records))  # JSON Lines named .json
    for name in ("r.json", "r.parquet", "r.csv", "l.json"):
        metrics, rows, rejects = run(tmp_path, data_config({"path": name, "type": "alpaca"}))
        assert (metrics["kept"], metrics["rejected"]) == (1, 1), name
        assert rejects[0]["reason"] == "empty" and rejects[0]["record"]["instruction"].startswith("c"), name
    _, _, rejects = run(tmp_path, data_config({"path": "r.csv", "type": "alpaca"}))
    assert rejects[0]["line"] == 3  # the CSV line where the bad row starts


def test_hub_dataset_path_uses_load_dataset(tmp_path):
    fake = [{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}]
    with mock.patch("datasets.load_dataset", return_value=fake) as load:
        metrics, rows, rejects = run(tmp_path, data_config({"path": "org/alpaca", "type": "alpaca", "split": "train"}))
    load.assert_called_once_with("org/alpaca", None, data_files=None, split="train", streaming=True)
    assert (metrics["kept"], metrics["rejected"], rows[0]["source"], rejects[0]["line"]) == (1, 1, "org/alpaca", 2)


def test_outputs_are_byte_identical(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cfg = data_config(
        {"path": "data/sample/alpaca.jsonl", "type": "alpaca"},
        {"path": "data/sample/chat.jsonl", "type": "chat", **SHAREGPT},
    )
    hashes = []
    for name in ("one", "two"):
        out = tmp_path / name
        out.mkdir()
        validate(cfg, ValidateInputs(repo), out)
        hashes.append(sha256_tree(out))
    assert hashes[0] == hashes[1]
    assert pq.read_metadata(tmp_path / "one/records.parquet").num_rows == 3000


def test_a_dataset_with_no_valid_record_stops_validate_naming_it(tmp_path):
    """Every record rejected: the wrong file, or the wrong type for it (exit 2), not a run that trains on
    the other datasets alone."""
    (tmp_path / "c.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 3)
    with pytest.raises(DataError, match=r"c.jsonl: no valid record among the 3 read \(the first rejected: c.jsonl:1"):
        run(tmp_path, data_config({"path": "c.jsonl", "type": "chat_template"}))

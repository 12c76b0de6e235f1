"""Training batches: reading data/packed, the two collators, and sequence isolation in packed rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from reprotune import testing as synthetic
from reprotune.config import load_params
from reprotune.hardware import resolve
from reprotune.model.builtin import build_tiny_llama
from reprotune.packed import IGNORE_INDEX as IGNORE
from reprotune.packed import PackedDataError, PackedRows, read_manifest
from reprotune.train import attention
from reprotune.train.batches import PaddedCollator, collate_padding_free
from reprotune.train.model import load_trainable

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")


def row(*lengths: int, seed: int = 0) -> dict:
    """A packed row of sequences with the given lengths (random ids, every label set)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 4096, sum(lengths))
    return {"input_ids": ids, "labels": ids.copy(), "seq_lens": np.array(lengths)}


def test_padding_free_concatenates_with_restarting_positions_and_no_mask():
    batch = collate_padding_free([row(3, 2, seed=1), row(4, seed=2)])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    assert batch["input_ids"].shape == (1, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    starts = [0, 3, 5]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    others = [i for i in range(9) if i not in starts]
    assert torch.equal(batch["labels"][0, others], batch["input_ids"][0, others])


def test_padded_batches_mask_and_unlabel_the_padding():
    batch = PaddedCollator(pad_id=0)([row(5, seed=1), row(3, seed=2)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"][1, 3:].tolist() == [IGNORE, IGNORE]
    assert batch["labels"][:, 0].tolist() == [IGNORE, IGNORE]


@pytest.mark.parametrize("packed", [True, False])
def test_rows_round_trip_through_parquet(tmp_path, packed):
    seqs = synthetic.sequences(40, seed=0, vocab=4096, max_len=64, mean_len=20)
    synthetic.write_packed_dir(tmp_path, {"train": seqs}, sequence_len=64, packed=packed)
    manifest = read_manifest(tmp_path)
    rows = PackedRows(tmp_path, "train")
    assert manifest["packed"] is packed and len(rows) == manifest["splits"]["train"]["rows"]
    assert (len(rows) < 40) is packed
    got = [ids for i in range(len(rows)) for ids in np.split(rows[i]["input_ids"], np.cumsum(rows[i]["seq_lens"])[:-1])]
    assert sorted(map(tuple, got)) == sorted(tuple(ids) for ids, _ in seqs)
    assert all(len(rows[i]["input_ids"]) <= 64 for i in range(len(rows)))


def test_inconsistent_rows_are_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train").mkdir()
    bad = {"input_ids": [[5, 6, 7]], "labels": [[5, 6, 7]], "position_ids": [[0, 1, 2]], "seq_lens": [[2]]}
    pq.write_table(pa.table(bad), tmp_path / "train" / "part-00000.parquet")
    with pytest.raises(PackedDataError, match="row 0 has 3 input_ids"):
        PackedRows(tmp_path, "train")
    with pytest.raises(PackedDataError, match="val: no part-.*tokenize stage"):
        PackedRows(tmp_path, "val")
    with pytest.raises(PackedDataError, match="manifest.json not found.*tokenize stage"):
        read_manifest(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_llama(out)
    return out


def per_sequence_losses(model, batch: dict, seq_lens: list[int]) -> list[float]:
    """Mean next-token loss of each sequence inside the (1, total) row `batch`."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    losses = torch.nn.functional.cross_entropy(
        logits[0, :-1], batch["labels"][0, 1:], reduction="none", ignore_index=IGNORE
    )
    out, start = [], 0
    for n in seq_lens:
        targets = batch["labels"][0, start + 1 : start + n] != IGNORE  # position t scores token t + 1
        out.append(losses[start : start + n - 1][targets].mean().item())
        start += n
    return out


# sdpa_packed is what training uses for packed rows on CPU; sdpa and eager get transformers' own
# block mask built from the restarting position_ids
@pytest.mark.parametrize(
    "attn, load_in_4bit", [("sdpa_packed", False), ("sdpa_packed", True), ("sdpa", False), ("eager", False)]
)
def test_each_packed_sequence_scores_as_if_alone(tiny, attn, load_in_4bit):
    quant = dataclasses.replace(PARAMS.quant, load_in_4bit=load_in_4bit)
    caps = resolve("auto", False, "sdpa" if attn == "sdpa_packed" else attn)
    attn = attention.effective(caps.attn_implementation, packed=attn == "sdpa_packed")
    model = load_trainable(tiny, quant, PARAMS.lora, PARAMS.train, caps, attn).eval()
    seqs = synthetic.sequences(5, seed=3, vocab=4096, max_len=60, mean_len=30)
    rows = [{"input_ids": ids, "labels": labels, "seq_lens": np.array([len(ids)])} for ids, labels in seqs]
    lens = [len(ids) for ids, _ in seqs]
    packed = collate_padding_free([{k: np.concatenate([r[k] for r in rows[:3]]) for k in rows[0]}, *rows[3:]])
    alone = [per_sequence_losses(model, collate_padding_free([r]), [n])[0] for r, n in zip(rows, lens)]
    together = per_sequence_losses(model, packed, lens)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)

    # negative control: positions that do not restart make the row one long causal sequence, so every
    # sequence after the first attends to its predecessors and scores differently
    unrestarted = {**packed, "position_ids": torch.arange(sum(lens)).unsqueeze(0)}
    leaked = per_sequence_losses(model, unrestarted, lens)
    assert leaked[0] == pytest.approx(alone[0], abs=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(leaked[1:], alone[1:]))

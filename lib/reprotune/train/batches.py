"""The two collators that turn rows of data/packed (reprotune.packed.PackedRows) into micro-batches.

- `collate_padding_free`: the micro-batch's rows are concatenated into ONE row (1, total_tokens),
  no padding and no attention mask. Each sequence is told apart by position_ids restarting at 0,
  which transformers turns into a block-diagonal mask (sdpa/eager) or varlen cu_seqlens (flash).
- `PaddedCollator`: rows padded on the right to the longest in the micro-batch, with an
  attention mask; used when the data was tokenized with sample_packing off.

Both collators set the label of every sequence's first token to -100: a causal LM predicts token
t from tokens < t, so in a concatenated row the first token of sequence k would otherwise be a
target predicted from the end of sequence k-1. (It is never a target inside its own sequence.)
position_ids are rebuilt from seq_lens rather than read, so seq_lens is the one source of truth.
"""

from __future__ import annotations

import numpy as np

from reprotune.packed import IGNORE_INDEX


def _first_tokens_unlabelled(labels: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    starts = np.cumsum(seq_lens) - seq_lens
    labels = labels.copy()
    labels[starts] = IGNORE_INDEX
    return labels


def collate_padding_free(rows: list[dict]) -> dict:
    """Rows -> one row of shape (1, total_tokens) with position_ids restarting per sequence, no mask."""
    import torch

    seq_lens = np.concatenate([r["seq_lens"] for r in rows])
    input_ids = np.concatenate([r["input_ids"] for r in rows]).astype(np.int64)
    labels = _first_tokens_unlabelled(np.concatenate([r["labels"] for r in rows]).astype(np.int64), seq_lens)
    starts = np.cumsum(seq_lens) - seq_lens
    position_ids = np.arange(len(input_ids)) - np.repeat(starts, seq_lens)  # 0..n-1 within each sequence
    return {
        name: torch.from_numpy(a).unsqueeze(0)
        for name, a in (("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids))
    }


class PaddedCollator:
    """Rows -> (batch, longest) tensors, right-padded with `pad_id`; pad labels -100, mask 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = r["input_ids"]
            labels[i, :n] = _first_tokens_unlabelled(r["labels"], r["seq_lens"])
            mask[i, :n] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask),
        }

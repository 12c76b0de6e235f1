"""Token-for-token parity with Axolotl 0.19, pinned: the first rows `axolotl preprocess` wrote for the
shipped sample data (tests/fixtures/axolotl/parity/, written by benchmarks/axolotl_parity.py --write-golden
with Axolotl installed) against what reprotune makes of the same Axolotl config: imported, validated,
tokenized. Every row is equal, or differs only in a way the benchmark documents as Axolotl's and checks by
recomputing Axolotl's way (tests/fixtures/axolotl_parity.py)."""

import copy
import json

import pytest

from fixtures import axolotl_parity as parity
from fixtures import make_tokenize_fixtures as fx

# (tokenizer, dataset) -> the one kind every golden row must have
EXPECTED = {
    ("builtin", "alpaca"): "same",
    ("builtin", "chat_template"): "eot_masked",  # ChatML's <|im_end|>: Axolotl masks it, reprotune trains it
    ("llama_spm", "alpaca"): "response_tokenized_apart",  # SentencePiece: Axolotl's response gets a leading "▁"
    ("llama_spm", "chat_template"): "same",
    # one shard (Axolotl's shuffle + shard), roles_to_train [user, assistant], train_on_eos last, tokens added
    ("builtin", "chat_shard_tokens"): "eot_masked",
    ("llama_spm", "chat_shard_tokens"): "same",
}
# every named chat template on the chat data (builtin tokenizer, whose special tokens are ChatML's): the
# ones that close turns with <|im_end|> differ as ChatML does, the rest are equal
IM_END_TEMPLATES = ("chatml", "falcon_h1", "nemotron_h", "phi_4", "qwen2_vl", "qwen3", "qwen3_5", "qwen_25")
EXPECTED |= {
    ("builtin", dataset): "eot_masked" if dataset.removeprefix(parity.TEMPLATE_PREFIX) in IM_END_TEMPLATES else "same"
    for dataset in parity.template_comparisons()
}


def compared(tokenizer_name: str, dataset: str) -> tuple:
    tokenizer = fx.load_tokenizer(tokenizer_name)
    golden = json.loads(parity.golden_path(tokenizer_name, dataset).read_text())["rows"]
    ours = parity.reprotune_side(tokenizer, dataset, limit=len(golden))
    return tokenizer, ours, [(row["input_ids"], row["labels"]) for row in golden]


@pytest.mark.parametrize("tokenizer_name, dataset", sorted(EXPECTED))
def test_reprotune_matches_axolotls_golden_rows(tokenizer_name, dataset):
    tokenizer, ours, theirs = compared(tokenizer_name, dataset)
    rows = parity.TEMPLATE_GOLDEN_ROWS if dataset.startswith(parity.TEMPLATE_PREFIX) else parity.GOLDEN_ROWS
    assert len(ours) == len(theirs) == rows
    kinds = [parity.classify(tokenizer, a, b) for a, b in zip(ours, theirs)]
    assert set(kinds) == {EXPECTED[tokenizer_name, dataset]}, [
        parity.first_difference(tokenizer, a, b) for a, b, k in zip(ours, theirs, kinds) if k == "unexpected"
    ][:1]


def test_a_real_difference_is_unexpected():
    """The classifier is not lenient: one more trained token, or one changed id, is unexpected."""
    tokenizer, ours, theirs = compared("builtin", "alpaca")
    ids, labels = copy.deepcopy(theirs[0])
    labels[1] = ids[1]  # Axolotl would have trained a prompt token
    assert parity.classify(tokenizer, ours[0], (ids, labels)) == "unexpected"
    ids, labels = copy.deepcopy(theirs[0])
    ids[3] = (ids[3] + 1) % len(tokenizer)
    assert parity.classify(tokenizer, ours[0], (ids, labels)) == "unexpected"


@pytest.mark.parametrize("tokenizer_name", ["builtin", "llama_spm"])
def test_the_added_token_is_in_the_pinned_rows(tokenizer_name):
    """The token the config adds ("capital letters") is one new id, in Axolotl's rows as in ours."""
    tokenizer, ours, theirs = compared(tokenizer_name, "chat_shard_tokens")
    new_id = len(tokenizer)  # the first id past the base vocabulary
    assert sum(new_id in ids for ids, _ in theirs) == sum(new_id in ids for ids, _, _ in ours) > 0

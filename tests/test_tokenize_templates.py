"""Prompt strategies and label masking: golden fixtures plus checks a person can read.

Two tokenizers: the built-in byte-level BPE (no BOS, ChatML) and a Llama-style SentencePiece one
(adds BOS, [INST] template that writes BOS itself and puts EOS after each answer). The goldens live in
tests/fixtures/tokenize/ and are rewritten only by tests/fixtures/make_tokenize_fixtures.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from reprotune.packed import IGNORE_INDEX
from reprotune.tokenize.templates import PromptEncoder, TokenizeError, alpaca_prompt

from fixtures import make_tokenize_fixtures as fx

END_OF_TURN = {"builtin": "<|im_end|>", "llama_spm": "</s>"}


@pytest.fixture(scope="module", params=["builtin", "llama_spm"])
def tok(request):
    tokenizer = fx.load_tokenizer(request.param)
    tokenizer.fixture_name = request.param
    return tokenizer


def encode(tokenizer, records, **changes):
    return PromptEncoder(tokenizer, dataclasses.replace(fx.BASE_CFG, **changes)).encode(records)


def runs(seq) -> list[list[int]]:
    """The labelled tokens of a sequence, one list per contiguous run."""
    out, prev = [], False
    for t, label in zip(seq.input_ids, seq.labels()):
        on = label != IGNORE_INDEX
        if on and prev:
            out[-1].append(t)
        elif on:
            out.append([t])
        prev = on
    return out


def check_bos_eos(tok, ids: list[int], eos: int = 1) -> None:
    """BOS exactly once and first where the tokenizer adds one, else never; `eos` EOS, one last."""
    if tok.fixture_name == "llama_spm":
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    else:
        assert tok.bos_token_id not in ids
    assert ids.count(tok.eos_token_id) == eos and (not eos or ids[-1] == tok.eos_token_id)


# ----------------------------------------------------------------------------- goldens


@pytest.fixture(scope="module")
def smollm2():
    return fx.load_tokenizer("smollm2")


@pytest.mark.parametrize("name", list(fx.BUILDERS))
@pytest.mark.parametrize("case", list(fx.CASES))
def test_golden(name, case):
    golden = json.loads(fx.fixture_path(name).read_text(encoding="utf-8"))
    assert fx.encode_case(fx.load_tokenizer(name), case) == golden[case]


# ----------------------------------------------------------------------------- train_on_eos (Axolotl's key)


@pytest.mark.parametrize(
    "train_on_eos, expected",
    [
        ("turn", ["Paris.{eot}", "Rome, of course.{eot}"]),
        ("last", ["Paris.", "Rome, of course.{eot}"]),
        ("none", ["Paris.", "Rome, of course."]),
    ],
)
def test_train_on_eos_chooses_which_end_of_turn_tokens_are_trained(tok, train_on_eos, expected):
    [seq] = encode(tok, [fx.CONVERSATION], train_on_eos=train_on_eos).sequences
    eot = END_OF_TURN[tok.fixture_name]
    assert [tok.decode(r).strip() for r in runs(seq)] == [e.format(eot=eot) for e in expected]


def test_train_on_eos_all_also_trains_the_end_of_untrained_turns(tok):
    [seq] = encode(tok, [fx.CONVERSATION], train_on_eos="all").sequences
    eot = END_OF_TURN[tok.fixture_name]
    ids = tok.convert_tokens_to_ids(eot)
    trained_eots = [t for t, label in zip(seq.input_ids, seq.labels()) if label == t == ids]
    # ChatML closes all 5 turns; the [INST] template writes an EOS only after each of the 2 answers
    assert len(trained_eots) == seq.input_ids.count(ids) == (5 if tok.fixture_name == "builtin" else 2)
    [turn] = encode(tok, [fx.CONVERSATION], train_on_eos="turn").sequences
    assert seq.input_ids == turn.input_ids


# ----------------------------------------------------------------------------- a real tokenizer: SmolLM2


def trained_and_untrained(tok, seq) -> tuple[list[str], str]:
    """Decoded trained runs, and the text with every trained token removed."""
    untrained = [t for t, label in zip(seq.input_ids, seq.labels()) if label == IGNORE_INDEX]
    return [tok.decode(r) for r in runs(seq)], tok.decode(untrained)


def test_smollm2_injected_system_message_and_headers_stay_untrained(smollm2):
    [seq] = encode(smollm2, [fx.NO_SYSTEM]).sequences
    trained, untrained = trained_and_untrained(smollm2, seq)
    assert trained == ["4<|im_end|>", "6<|im_end|>"]  # each assistant turn with its end of turn, nothing else
    assert untrained == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_smollm2_alpaca_through_its_chat_template(smollm2):
    [seq] = encode(smollm2, [fx.ALPACA], alpaca_format="chat_template").sequences
    trained, untrained = trained_and_untrained(smollm2, seq)
    assert trained == ["42<|im_end|>"]
    assert untrained.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nAdd 12 and 30.<|im_end|>\n<|im_start|>assistant\n" in untrained


def test_labels_equal_ids_where_set(tok):
    for case in fx.CASES:
        for seq in fx.encode_case(tok, case)["sequences"]:
            assert len(seq["labels"]) == len(seq["input_ids"])
            assert seq["labels"][0] == IGNORE_INDEX
            assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(seq["input_ids"], seq["labels"]))


# ----------------------------------------------------------------------------- alpaca


@pytest.mark.parametrize("record", [fx.ALPACA, fx.ALPACA_FULL])
def test_alpaca_trains_response_and_eos_only(tok, record):
    [seq] = encode(tok, [record]).sequences
    assert [tok.decode(r) for r in runs(seq)] == [record["output"] + tok.eos_token]
    check_bos_eos(tok, seq.input_ids)
    prompt = alpaca_prompt(record["system"], record["instruction"], record["input"])
    # the prompt part is exactly what the tokenizer itself makes of the prompt (BOS included or not)
    expected_prompt = tok(prompt)["input_ids"]
    assert seq.input_ids[: len(expected_prompt)] == expected_prompt


def test_alpaca_prompt_is_axolotls_character_for_character():
    """The texts of Axolotl 0.19's AlpacaPrompter (instruct style) and alpaca_w_system's SystemDataPrompter,
    written out here so that a change to either side shows."""
    assert alpaca_prompt(None, "Add 1 and 2.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 1 and 2.\n\n### Response:\n"
    )
    assert alpaca_prompt(None, "Sort.", "3 1") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort.\n\n### Input:\n3 1\n\n### Response:\n"
    )
    assert alpaca_prompt("Be brief.", "Sort.", "3 1") == (
        "### System:\nBe brief.\n\n### Instruction:\nSort.\n\n### Input:\n3 1\n\n### Response:\n"
    )


def test_alpaca_train_on_inputs_labels_everything_but_position_0(tok):
    [seq] = encode(tok, [fx.ALPACA_FULL], train_on_inputs=True).sequences
    assert seq.labels()[1:] == seq.input_ids[1:]
    check_bos_eos(tok, seq.input_ids)


def test_alpaca_via_chat_template_is_the_chat_strategy(tok):
    [via_alpaca] = encode(tok, [fx.ALPACA_FULL], alpaca_format="chat_template").sequences
    conversation = fx.chat(
        ("system", "You are a careful assistant."),
        ("user", "Sort these numbers from smallest to largest.\n\n3 1 2"),
        ("assistant", "1 2 3"),
    )
    [via_chat] = encode(tok, [conversation]).sequences
    assert via_alpaca == via_chat
    assert [tok.decode(r) for r in runs(via_alpaca)] == ["1 2 3" + END_OF_TURN[tok.fixture_name]]


# ----------------------------------------------------------------------------- chat


def test_chat_trains_assistant_turns_with_their_end_of_turn(tok):
    [seq] = encode(tok, [fx.CONVERSATION]).sequences
    end = END_OF_TURN[tok.fixture_name]
    assert [tok.decode(r) for r in runs(seq)] == ["Paris." + end, "Rome, of course." + end]
    check_bos_eos(tok, seq.input_ids, eos=2 if tok.fixture_name == "llama_spm" else 0)  # [INST]: one per answer
    if tok.fixture_name == "llama_spm":  # the template writes BOS and the tokenizer adds one: still one
        assert tok.apply_chat_template(fx.CONVERSATION["messages"], tokenize=False).startswith("<s>")


def test_chat_roles_to_train_user_and_assistant(tok):
    [seq] = encode(tok, [fx.CONVERSATION], roles_to_train=("user", "assistant")).sequences
    texts = [tok.decode(r) for r in runs(seq)]
    if tok.fixture_name == "builtin":  # each turn's header (<|im_start|>role\n) stays untrained
        assert texts == [
            "What is the capital of France?<|im_end|>",
            "Paris.<|im_end|>",
            "And of Italy?<|im_end|>",
            "Rome, of course.<|im_end|>",
        ]
    else:  # the system prompt sits inside the first [INST] block, in its header; " [/INST]" closes a user
        # turn in plain text (not a special token): template markup, untrained, as Axolotl leaves it
        assert texts == ["What is the capital of France?", "Paris.</s>", "And of Italy?", "Rome, of course.</s>"]
    assert all("Answer briefly" not in t for t in texts)


def test_chat_train_on_inputs(tok):
    [seq] = encode(tok, [fx.CONVERSATION], train_on_inputs=True).sequences
    assert seq.labels()[1:] == seq.input_ids[1:]


def test_chat_without_a_trained_role_is_dropped(tok):
    enc = encode(tok, [fx.CONVERSATION], roles_to_train=("tool",))
    assert enc.sequences == [] and enc.counts["dropped_no_trainable"] == 1


def test_chat_span_ending_inside_a_multibyte_character():
    # no end-of-turn token: the trained span ends right after the emoji, whose bytes are 4 tokens
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
    [seq] = encode(tok, [fx.chat(("user", "hi"), ("assistant", "ok 😀"), ("user", "bye"))]).sequences
    assert [tok.decode(r) for r in runs(seq)] == ["ok 😀"]


def test_chat_template_that_renders_by_position_is_masked_as_rendered():
    # the last message gets a marker the earlier ones do not (as Qwen 3 writes a thinking block on the last
    # answer only): rendering a prefix would not give a prefix of the whole, the sentinel in place does
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    [seq] = encode(tok, [fx.CONVERSATION]).sequences
    assert [tok.decode(r) for r in runs(seq)] == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]


def test_content_the_template_rewrites_is_refused():
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}</s>{% endfor %}"
    with pytest.raises(TokenizeError, match=r"fixtures.jsonl:1: chat template of .*'assistant' message's content"):
        encode(tok, [fx.CONVERSATION])


def test_role_folded_into_another_turn_is_found_in_place():
    tok = fx.load_tokenizer("llama_spm")  # the [INST] template renders system only inside the first user turn
    [seq] = encode(tok, [fx.CONVERSATION], roles_to_train=("system", "assistant")).sequences
    assert [tok.decode(r) for r in runs(seq)] == ["Answer briefly.", "Paris.</s>", "Rome, of course.</s>"]


def test_tokenizer_without_chat_template_is_refused():
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = None
    with pytest.raises(TokenizeError, match="no chat template"):
        encode(tok, [fx.CONVERSATION])


# ----------------------------------------------------------------------------- completion


def test_completion_trains_every_token_and_ends_with_eos(tok):
    [seq] = encode(tok, [fx.completion("Water boils at one hundred degrees.")]).sequences
    assert seq.labels()[1:] == seq.input_ids[1:]
    check_bos_eos(tok, seq.input_ids)


def test_completion_is_chunked_at_sequence_len(tok):
    whole = encode(tok, [fx.completion(fx.LONG_TEXT)]).sequences[0].input_ids
    chunks = encode(tok, [fx.completion(fx.LONG_TEXT)], sequence_len=16).sequences
    assert [len(c.input_ids) for c in chunks[:-1]] == [16] * (len(chunks) - 1) and len(chunks) >= 2
    assert [t for c in chunks for t in c.input_ids] == whole
    for c in chunks:
        assert c.labels()[1:] == c.input_ids[1:]
    check_bos_eos(tok, whole)


# ----------------------------------------------------------------------------- length policy


def test_truncate_keeps_the_start_and_counts(tok):
    enc = encode(tok, [fx.alpaca("Repeat.", fx.LONG_TEXT)], sequence_len=70, excess_length="truncate")
    [seq] = enc.sequences
    assert len(seq.input_ids) == 70 and enc.counts["truncated"] == 1
    assert fx.LONG_TEXT.startswith(tok.decode(runs(seq)[0]))
    assert tok.eos_token_id not in seq.input_ids


def test_truncation_that_removes_the_response_drops(tok):
    enc = encode(tok, [fx.alpaca(fx.LONG_TEXT, "ok")], sequence_len=70, excess_length="truncate")
    assert enc.sequences == [] and enc.counts == {"truncated": 1, "dropped_no_trainable": 1}


def test_drop_counts_and_keeps_the_rest(tok):
    enc = encode(tok, [fx.alpaca(fx.LONG_TEXT, "ok"), fx.ALPACA], sequence_len=70)
    assert enc.counts["dropped_too_long"] == 1 and enc.record == [1]


def test_error_names_the_record(tok):
    with pytest.raises(TokenizeError, match=r"fixtures.jsonl:7: \d+ tokens, over tokenize.sequence_len 70"):
        encode(tok, [fx.alpaca(fx.LONG_TEXT, "ok", line=7)], sequence_len=70, excess_length="error")


def test_a_special_token_that_opens_the_next_turn_is_not_its_end():
    # no <|im_end|>: the <|im_start|> after each answer opens the next turn; only EOS and what closes the
    # last turn end one (here nothing does), so no turn-opening marker is trained, even with train_on_eos all
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    [seq] = encode(tok, [fx.CONVERSATION], train_on_eos="all").sequences
    assert [tok.decode(r) for r in runs(seq)] == ["Paris.", "Rome, of course."]


def test_a_template_that_renders_other_text_by_a_content_is_refused():
    # the last user question echoed after the answer: replacing it changes the render in two places
    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "(re: {{ messages[-2]['content'] }})"
    )
    with pytest.raises(TokenizeError, match=r"'user' message's content once, as written"):
        encode(tok, [fx.CONVERSATION], roles_to_train=("user", "assistant"))


def test_qwen3_reasoning_in_an_answer_is_trained_with_it():
    """Qwen 3's template renders an answer's `<think>...</think>` as its thinking block: reasoning and answer
    are the answer's labelled text, as Axolotl trains them."""
    from reprotune.model.chat_templates import named_template

    tok = copy.deepcopy(fx.load_tokenizer("builtin"))
    tok.chat_template = named_template("qwen3")
    record = fx.chat(("user", "What is 2 + 2?"), ("assistant", "<think>\nadd them\n</think>\n\n4"))
    [seq] = encode(tok, [record]).sequences
    assert [tok.decode(r) for r in runs(seq)] == ["add them\n</think>\n\n4<|im_end|>"]

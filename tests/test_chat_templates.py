"""Named chat templates and special tokens, written into the base tokenizer by the base stage
(model/chat_templates.py). Every template Axolotl 0.19 ships renders as Axolotl renders it: pinned here by
Axolotl's own renders (tests/fixtures/axolotl/parity/templates/renders.json, written by
benchmarks/axolotl_parity.py --write-golden, which compares all of them on the sample conversations)."""

import json

import jinja2
import pytest
from conftest import REPO

from reprotune.config.sections import CHAT_TEMPLATE_NAMES
from reprotune.model.base import BaseInputs, resolve_base
from reprotune.model.chat_templates import named_template
from reprotune.tokenize.templates import PromptEncoder

from fixtures import make_tokenize_fixtures as fx
from fixtures.axolotl_parity import RENDER_GOLDEN
from helpers import params_with

TURNS = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
# what each template renders for TURNS with the built-in tokenizer (BOS <s>, EOS </s>)
RENDERED = {
    "chatml": "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>",
    "mistral_v1": "<s> [INST] Hi? [/INST] Hello.</s>",
    "gemma": "<s><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n",
    "phi_3": "<s><|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n",
    "qwen_25": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
}


@pytest.fixture(scope="module")
def tok():
    return fx.load_tokenizer("builtin")


def test_params_accept_exactly_the_template_files():
    folder = REPO / "lib/reprotune/model/templates"
    assert sorted(p.stem for p in folder.glob("*.jinja")) == sorted(CHAT_TEMPLATE_NAMES)
    assert len(CHAT_TEMPLATE_NAMES) == 36  # every one Axolotl 0.19 ships


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_named_template_renders_and_masks(tok, name):
    assert tok.apply_chat_template(TURNS, chat_template=named_template(name), tokenize=False) == RENDERED[name]
    tok.chat_template = named_template(name)
    [seq] = PromptEncoder(tok, fx.BASE_CFG).encode([fx.chat(("user", "Hi?"), ("assistant", "Hello."))]).sequences
    trained = tok.decode([t for t, label in zip(seq.input_ids, seq.labels()) if label != -100])
    assert trained.startswith("Hello.") and "Hi?" not in trained


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_every_named_template_renders_as_axolotls(tok, name):
    golden = json.loads(RENDER_GOLDEN.read_text())
    for (messages, generation), theirs in zip(golden["cases"], golden["renders"][name], strict=True):
        try:
            ours = tok.apply_chat_template(
                messages, chat_template=named_template(name), tokenize=False, add_generation_prompt=generation
            )
        except jinja2.TemplateError:
            ours = "<refused>"
        assert ours == theirs


def base(tmp_path, **changes) -> tuple[dict, object]:
    from transformers import AutoTokenizer

    out = tmp_path / "base"
    prov = resolve_base(params_with(base={"model": "builtin:tiny-llama", **changes}), BaseInputs(), out)
    return prov, AutoTokenizer.from_pretrained(out)


def test_base_stage_writes_the_named_template_and_special_tokens(tmp_path):
    prov, tokenizer = base(tmp_path, chat_template="llama3", special_tokens={"eos_token": "<|im_end|>"})
    assert tokenizer.chat_template == named_template("llama3") and tokenizer.eos_token == "<|im_end|>"
    assert prov["tokenizer"] == {"chat_template": "llama3", "special_tokens": {"eos_token": "<|im_end|>"}}
    stops = json.loads((tmp_path / "base/generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops  # generation stops at the new EOS too


def test_defaults_leave_the_tokenizer_as_the_source_gave_it(tmp_path, tiny_model_dir):
    prov, tokenizer = base(tmp_path)
    assert "tokenizer" not in prov
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "base" / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_fallback_keeps_the_tokenizers_own_template(tmp_path, tiny_model_dir):
    _, tokenizer = base(tmp_path, chat_template="tokenizer_default_fallback_gemma")
    assert tokenizer.chat_template == (tiny_model_dir / "chat_template.jinja").read_text()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # nothing rewritten: no loader keys leak in
        assert (tmp_path / "base" / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_a_rewritten_tokenizer_keeps_no_record_of_where_it_was_loaded_from(tmp_path):
    base(tmp_path, chat_template="chatml")
    config = json.loads((tmp_path / "base/tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "name_or_path"} & set(config)


def test_a_token_the_vocabulary_lacks_is_added_as_a_special_token(tmp_path):
    """As Axolotl does (tests/test_added_tokens.py follows the new rows through training and merge)."""
    prov, tokenizer = base(tmp_path, special_tokens={"pad_token": "<|pad_new|>"})
    assert tokenizer.pad_token == "<|pad_new|>" and prov["tokenizer"]["added_tokens"] == {"<|pad_new|>": 4096}
    assert tokenizer.decode([5, 4096], skip_special_tokens=True) == tokenizer.decode([5])  # special: skipped

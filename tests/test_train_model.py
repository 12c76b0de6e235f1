"""The trainable model: 4-bit loading, LoRA targets found from the model, checked names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from reprotune.config import load_params
from reprotune.errors import BadInput
from reprotune.hardware import resolve
from reprotune.model.builtin import build_tiny_llama
from reprotune.train.model import linear_leaf_names, load_trainable

REPO = Path(__file__).resolve().parents[1]
PARAMS = load_params(REPO / "params.yaml")
CPU = resolve("auto", False, "auto")
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_llama(out)
    return out


def build(tiny: Path, quant: dict | None = None, lora: dict | None = None):
    q = dataclasses.replace(PARAMS.quant, **(quant or {}))
    lo = dataclasses.replace(PARAMS.lora, **(lora or {}))
    return load_trainable(tiny, q, lo, PARAMS.train, CPU, CPU.attn_implementation)


def test_qlora_base_is_4bit_nf4_double_quant_with_adapters_on_every_linear_but_the_head(tiny):
    import bitsandbytes as bnb

    model = build(tiny, lora={"modules_to_save": ()})  # the params.yaml demo also trains embed/head
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested: the scales are quantized too
    assert q_proj.base_layer.weight.dtype == torch.uint8 and q_proj.base_layer.compute_dtype == torch.float32
    assert sorted(model.peft_config["default"].target_modules) == LINEARS
    assert not hasattr(model.base_model.model.lm_head, "lora_A")
    assert model.config.use_cache is False and model.config._attn_implementation == "sdpa"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_without_4bit_the_base_stays_in_the_compute_dtype(tiny):
    model = build(tiny, quant={"load_in_4bit": False})
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear and q_proj.base_layer.weight.dtype == torch.float32


def test_explicit_targets_rsLoRA_DoRA_and_modules_to_save(tiny):
    model = build(
        tiny,
        quant={"load_in_4bit": False},
        lora={
            "target_linear": False,
            "target_modules": ("q_proj", "v_proj"),
            "modules_to_save": ("lm_head",),
            "use_rslora": True,
            "use_dora": True,
            "r": 4,
            "alpha": 8,
        },
    )
    attn = model.base_model.model.model.layers[0].self_attn
    assert hasattr(attn.q_proj, "lora_A") and hasattr(attn.v_proj, "lora_A") and not hasattr(attn.k_proj, "lora_A")
    assert attn.q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in attn.q_proj.lora_magnitude_vector  # DoRA
    assert any(
        n.endswith("lm_head.modules_to_save.default.weight") for n, p in model.named_parameters() if p.requires_grad
    )


@pytest.mark.parametrize(
    "key, lora",
    [
        ("lora.target_modules", {"target_linear": False, "target_modules": ("q_proj", "qkv_proj")}),
        ("lora.modules_to_save", {"modules_to_save": ("embed_token",)}),
    ],
)
def test_a_name_that_matches_no_module_is_an_error_naming_it(tiny, key, lora):
    bad = (lora.get("target_modules") or lora["modules_to_save"])[-1]
    with pytest.raises(BadInput, match=rf"{key}: '{bad}' matches no module.*q_proj"):  # exit 2
        build(tiny, quant={"load_in_4bit": False}, lora=lora)


def test_adapter_init_follows_the_seed(tiny):
    def lora_a(seed):
        train = dataclasses.replace(PARAMS.train, seed=seed)
        quant = dataclasses.replace(PARAMS.quant, load_in_4bit=False)
        model = load_trainable(tiny, quant, PARAMS.lora, train, CPU, CPU.attn_implementation)
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    assert torch.equal(lora_a(1), lora_a(1)) and not torch.equal(lora_a(1), lora_a(2))


def test_a_head_that_shares_its_name_with_other_linears_is_bad_input():
    # target_linear finds layers by their last name part, so it could not leave such a head out (exit 2)
    model = torch.nn.ModuleDict(
        {"lm_head": torch.nn.Linear(2, 2), "block": torch.nn.ModuleDict({"lm_head": torch.nn.Linear(2, 2)})}
    )
    with pytest.raises(BadInput, match="lora.target_linear: the output head 'lm_head' shares its name"):
        linear_leaf_names(model, exclude="lm_head")


@pytest.fixture(scope="module")
def tied(tied_model_dir) -> Path:
    return tied_model_dir


@pytest.mark.parametrize(
    "key, lora",
    [
        ("lora.target_modules", {"target_linear": False, "target_modules": ("q_proj", "lm_head")}),
        ("lora.modules_to_save", {"modules_to_save": ("embed_tokens",)}),
        ("lora.modules_to_save", {"modules_to_save": ("lm_head",)}),
    ],
)
def test_training_one_side_of_tied_embeddings_is_bad_input(tied, key, lora):
    entry = (lora.get("target_modules") or lora["modules_to_save"])[-1]
    with pytest.raises(BadInput, match=rf"{key}: '{entry}' is tied to the"):
        build(tied, quant={"load_in_4bit": False}, lora=lora)


def test_tied_base_trains_every_linear_but_the_head(tied):
    model = build(tied, quant={"load_in_4bit": False}, lora={"modules_to_save": None})
    assert model.base_model.model.config.tie_word_embeddings
    assert not any("lm_head.lora" in name for name, _ in model.named_parameters())


IDS = [4094, 4095]  # stand-ins for added tokens: adapter_config only needs their ids


@pytest.fixture(scope="module")
def plain(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny)


@pytest.mark.parametrize(
    "saved, rows",
    [
        (None, {"model.embed_tokens": IDS, "lm_head": IDS}),
        (("embed_tokens",), {"lm_head": IDS}),
        (("lm_head",), {"model.embed_tokens": IDS}),
        (("embed_tokens", "lm_head"), None),
    ],
)
def test_added_token_rows_are_trained_where_modules_to_save_does_not_train_the_whole_layer(plain, saved, rows):
    from reprotune.train.model import adapter_config

    config = adapter_config(plain, dataclasses.replace(PARAMS.lora, modules_to_save=saved), IDS)
    assert config.trainable_token_indices == rows and config.modules_to_save == (list(saved) if saved else None)


def test_lora_on_a_layer_with_added_token_rows_is_bad_input(plain):
    from reprotune.train.model import adapter_config

    lora = dataclasses.replace(PARAMS.lora, target_linear=False, target_modules=("q_proj", "lm_head"),
                               modules_to_save=None)  # fmt: skip
    with pytest.raises(BadInput, match=r"lora.target_modules: 'lm_head' gets rows for the tokens added"):
        adapter_config(plain, lora, IDS)


def test_tied_head_follows_the_added_token_rows_of_the_embedding(tied):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from reprotune.train.model import adapter_config

    model = AutoModelForCausalLM.from_pretrained(tied)
    config = adapter_config(model, dataclasses.replace(PARAMS.lora, modules_to_save=None), IDS)
    assert config.trainable_token_indices == {"model.embed_tokens": IDS}
    peft_model = get_peft_model(model, config)
    embed, head = peft_model.get_input_embeddings(), peft_model.get_output_embeddings()
    assert head.token_adapter.tied_adapter is embed.token_adapter  # one set of trained rows for both uses

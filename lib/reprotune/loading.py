"""Model folders as every stage after `base` reads them: tokenizer files, stored dtype, stop tokens,
the ids of tokens the base stage added (its provenance record's format), and loading a model for
inference (scoring, generation, merge verification).

A model folder is what save_pretrained writes: config.json, safetensors weights, tokenizer files,
optionally generation_config.json. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import shutil
from pathlib import Path

from reprotune.hardware import device_type

PROVENANCE_FILE = "reprotune_base.json"  # the base stage's record of where models/base came from
# Every file a tokenizer (or chat template) may need, as glob patterns.
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "*.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
)


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst`; returns their names."""
    names = sorted(p.name for p in Path(src).iterdir() if p.is_file() and is_tokenizer_file(p.name))
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def stored_dtype(config: dict) -> str | None:
    """The dtype name the checkpoint's weights are stored in (transformers v5 key, or v4's), if recorded."""
    return config.get("dtype") or config.get("torch_dtype")


def load_model(path: Path, dtype, trust_remote_code: bool):
    """The model in `path` in `dtype`, on CUDA when available, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device_type()).eval()


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM (under peft's wrapper, if any) can run its head on chosen positions only."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(causal_lm.forward).parameters


def stop_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS of the tokenizer plus every eos_token_id of the generation config (end of turn too)."""
    from transformers import GenerationConfig

    stops = {tokenizer.eos_token_id} - {None}
    if (Path(model_dir) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return stops


def added_record(tokenizer, before: int, rows: dict[str, int]) -> dict:
    """What the provenance records: {"added_tokens": {token: id}, "embedding_rows": {"before", "after"}}
    for the ids from `before` (the tokenizer's length before tokens were added) on."""
    ids = range(before, len(tokenizer))
    return {"added_tokens": dict(zip(tokenizer.convert_ids_to_tokens(list(ids)), ids)), "embedding_rows": rows}


def matches(name: str, entries: list[str]) -> bool:
    """Whether module `name` is named by an entry, fully or as a dotted suffix (peft's matching rule for
    target_modules, modules_to_save and trainable_token_indices)."""
    return any(name == entry or name.endswith("." + entry) for entry in entries)


def added_token_ids(base_dir: Path) -> list[int]:
    """The ids the base stage added to the vocabulary (sorted), from models/base's provenance; [] when none."""
    path = Path(base_dir) / PROVENANCE_FILE
    if not path.is_file():
        return []
    record = json.loads(path.read_text(encoding="utf-8")).get("tokenizer", {})
    return sorted(record.get("added_tokens", {}).values())

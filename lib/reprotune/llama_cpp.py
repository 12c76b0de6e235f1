"""llama.cpp's name for a tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), chosen by behaviour.

The contract between this project and llama.cpp's vocabularies, both ways: the export stage names the
pre-tokenizer of the GGUF it writes, and the base stage checks that a tokenizer rebuilt from a GGUF
file splits text the way the name in that file says (a GGUF as the base model).

llama.cpp splits text before BPE with one of a fixed set of regexes, picked by this name; a name it
does not know fails the load ("unknown pre-tokenizer type"), and a wrong known name tokenizes
differently from transformers without any error. So the name is chosen the way llama.cpp's own
converter does it, from what the tokenizer does to a fixed probe text, never from the JSON's shape:
1. The converter's table (llama_cpp.json: the probe text and, per known tokenizer, the SHA-256 of
   str(tokenizer.encode(probe))): a tokenizer llama.cpp's converter knows gets the converter's name.
   That covers the published GPT-2, Llama 3, SmolLM, Qwen2 ... tokenizers.
2. Otherwise (a vocabulary of its own, such as the built-in model's) its pre-tokenizer must split the
   probe exactly as the reference pre-tokenizer of one name does, built from llama.cpp's regex for it
   with the `tokenizers` library, and leave the probe unchanged by any normalizer.
Anything else is refused (GGUFUnsupported, exit 2) with what was found. The table and the probe come
from one pinned llama.cpp version (see `source` in llama_cpp.json); tests check every name this
module can return against that version's list of names its vocabulary loader accepts.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from reprotune.errors import BadInput


class GGUFUnsupported(BadInput):
    """A checkpoint or tokenizer that cannot be converted exactly to or from GGUF."""


# llama.cpp's regexes (src/llama-vocab.cpp) for the names matched by behaviour
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # single digits, else as Llama 3
# llama.cpp skips BPE merges for words already in the vocabulary under these names (ignore_merges)
IGNORES_MERGES = {"llama-bpe"}


@cache
def converter_table() -> dict:
    """The probe text and the known tokenizer hashes of llama.cpp's converter (llama_cpp.json)."""
    return json.loads(Path(__file__).with_name("llama_cpp.json").read_text(encoding="utf-8"))


def probe_hash(tokenizer) -> str:
    """What llama.cpp's converter hashes: str() of the probe's token ids, special tokens added."""
    ids = tokenizer.encode(converter_table()["probe_text"])
    return hashlib.sha256(str(ids).encode()).hexdigest()


def reference_pre_tokenizers() -> dict:
    """One `tokenizers` pre-tokenizer per name, splitting as llama.cpp's regex for that name does."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split_then_bytes(regex: str):
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"), pt.ByteLevel(False, use_regex=False)])

    return {
        "gpt-2": split_then_bytes(GPT2_REGEX),
        "llama-bpe": split_then_bytes(LLAMA3_REGEX),
        "qwen2": split_then_bytes(QWEN2_REGEX),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), split_then_bytes(GPT2_REGEX)]),
    }


def names() -> set[str]:
    """Every name pre_tokenizer_name can return."""
    return set(converter_table()["known_hashes"].values()) | set(reference_pre_tokenizers())


def pre_tokenizer_name(tokenizer, spec: dict, key: str = "export.formats gguf") -> str:
    """llama.cpp's name for the fast `tokenizer` (its tokenizer.json as `spec`); BadInput when none fits,
    its message starting with `key` (the params key that asked for the conversion)."""
    digest = probe_hash(tokenizer)
    known = converter_table()["known_hashes"].get(digest)
    if known:
        return known
    backend = tokenizer.backend_tokenizer
    probe = converter_table()["probe_text"]
    if backend.normalizer is not None and backend.normalizer.normalize_str(probe) != probe:
        raise _refusal(key, spec, digest, "its normalizer changes text before the split, which llama.cpp never does")
    pieces = backend.pre_tokenizer.pre_tokenize_str(probe) if backend.pre_tokenizer else [(probe, None)]
    ignores_merges = bool(spec["model"].get("ignore_merges"))
    for name, reference in reference_pre_tokenizers().items():
        if reference.pre_tokenize_str(probe) == pieces and ignores_merges == (name in IGNORES_MERGES):
            return name
    raise _refusal(key, spec, digest, "its split of llama.cpp's probe text matches none of " + ", ".join(names()))


def _refusal(key: str, spec: dict, digest: str, why: str) -> GGUFUnsupported:
    found = json.dumps(spec.get("pre_tokenizer"), sort_keys=True)[:300]
    return GGUFUnsupported(
        f"{key}: no llama.cpp pre-tokenizer name fits this tokenizer ({why}; probe hash "
        f"{digest[:12]}..., pre_tokenizer {found})"
        + ("; convert it with llama.cpp's convert_hf_to_gguf.py" if key.startswith("export") else "")
    )

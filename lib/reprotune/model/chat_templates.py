"""The base model's tokenizer as params ask for it: a named or custom chat template, special and added tokens.

Features
- base.chat_template: `tokenizer_default` (the tokenizer's own; a tokenizer without one is fine until a
  chat record needs one, which tokenize reports), a named template (every one Axolotl 0.19 ships: chatml,
  llama3, llama4, qwen3, gemma3, mistral_v7_tekken, ... config/sections.py lists the 36),
  `tokenizer_default_fallback_<name>` (the tokenizer's own if it has one, else the named one) or `jinja`
  (base.chat_template_jinja's text). The named templates are Axolotl's files, kept verbatim in templates/
  (templates/README.md: where they come from, their licence); benchmarks/axolotl_parity.py renders each
  against the installed Axolotl's, and tests/fixtures/chat_templates.json pins what each renders.
- base.special_tokens: bos_token / eos_token / pad_token / unk_token given to a token the vocabulary has
  (Axolotl configs often name the tokenizer's own, or a reserved token as pad) or, as Axolotl does, to a
  new token added as a special token (not normalized, no strip). A new eos_token also becomes a stop token
  in generation_config.json.
- base.tokens: added to the vocabulary as Axolotl adds them (plain added tokens, not normalized, no
  strip), each then one id. New ids get embedding rows (model/vocab.py grows models/base) and are
  recorded in the returned provenance ("added_tokens", "embedding_rows") for training to learn them.
- Applied in the base stage, so every later stage, and the exported model, reads the same tokenizer.
  With the defaults nothing is rewritten and models/base is byte for byte what the source gave.

Trade-offs
- Records are text conversations: a template's tool-call and image branches are kept, unused.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from reprotune.io import write_json
from reprotune.loading import added_record
from reprotune.model.vocab import grow_embeddings

DROPPED_TOKENIZER_KEYS = ("name_or_path", "is_local", "local_files_only")

TEMPLATES_DIR = "templates"  # <name>.jinja beside this module, one file per named template


def named_template(name: str) -> str:
    """The text of a named chat template (templates/<name>.jinja, as Axolotl 0.19 ships it)."""
    return resources.files("reprotune.model").joinpath(TEMPLATES_DIR, f"{name}.jinja").read_text("utf-8")


def chosen_template(choice: str, own: str | None, jinja: str | None) -> str | None:
    """The template text for base.chat_template `choice`, given the tokenizer's own; None: keep the tokenizer's."""
    if choice == "tokenizer_default":
        # its own, or none: fine until a chat record needs one (tokenize says so), e.g. a base model given
        # base.tokens for completion data
        return None
    if choice == "jinja":
        return jinja
    if choice.startswith("tokenizer_default_fallback_"):
        return None if own else named_template(choice.removeprefix("tokenizer_default_fallback_"))
    return named_template(choice)


def apply_tokenizer_params(
    out_dir: Path,
    chat_template: str,
    jinja: str | None,
    special_tokens: dict,
    tokens: tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> dict:
    """Rewrite the tokenizer in `out_dir` as base.chat_template / base.special_tokens / base.tokens say, growing
    the embeddings for new tokens; returns what was done (for the provenance record). Nothing is written when
    the tokenizer stays as it is (all at their defaults, or a fallback template where it has its own)."""
    from transformers import AutoTokenizer

    if chat_template == "tokenizer_default" and not special_tokens and not tokens:
        return {}  # a tokenizer without a template is fine until a chat record needs one (tokenize says so)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=trust_remote_code)
    done: dict = {"chat_template": chat_template}
    template = chosen_template(chat_template, tokenizer.chat_template, jinja)
    if template is None and not special_tokens and not tokens:
        return done
    if template is not None:
        tokenizer.chat_template = template
    before = len(tokenizer)
    add_to_vocabulary(tokenizer, special_tokens, tokens)
    if special_tokens:
        done["special_tokens"] = dict(sorted(special_tokens.items()))
    if tokens:
        done["tokens"] = list(tokens)
    save_tokenizer(tokenizer, out_dir)
    if len(tokenizer) > before:
        done |= added_record(tokenizer, before, grow_embeddings(out_dir, len(tokenizer)))
    if "eos_token" in special_tokens:
        _add_stop_token(out_dir, tokenizer.eos_token_id)
    return done


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained, less the loader's record of where it read from (a path, this machine's hub
    settings), which would differ between machines and reach the published model."""
    tokenizer.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    values = json.loads(config_path.read_text(encoding="utf-8"))
    for key in DROPPED_TOKENIZER_KEYS:
        values.pop(key, None)
    write_json(config_path, values)


def add_to_vocabulary(tokenizer, special_tokens: dict, tokens: tuple[str, ...]) -> None:
    """Give the special-token roles (adding a token the vocabulary lacks) and add `tokens`, as Axolotl's
    load_tokenizer does; in place."""
    for key, token in sorted(special_tokens.items()):
        if in_vocabulary(tokenizer, token):
            setattr(tokenizer, key, token)
        else:
            tokenizer.add_special_tokens({key: _added(token)})
    tokenizer.add_tokens([_added(t) for t in tokens])  # a token the vocabulary has keeps its id


def in_vocabulary(tokenizer, token: str) -> bool:
    """Whether `token` is one id of the vocabulary (a tokenizer with an unk token maps unknown ones to it)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    return bool(ids) and ids[0] is not None and (ids[0] != tokenizer.unk_token_id or token == tokenizer.unk_token)


def _added(token: str):
    """A token as Axolotl adds it: matched verbatim in the raw text (not normalized), spaces around it kept."""
    from tokenizers import AddedToken

    return AddedToken(token, rstrip=False, lstrip=False, normalized=False)


def _add_stop_token(out_dir: Path, token_id: int) -> None:
    path = out_dir / "generation_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    stops = config.get("eos_token_id")
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if token_id not in stops:
        config["eos_token_id"] = [*stops, token_id]
        write_json(path, config)

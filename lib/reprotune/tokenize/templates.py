"""Prompt strategies: validated records -> token sequences whose labels are -100 where no loss is taken.

Features
- One mechanism for every strategy: a record is rendered to one text plus the character spans that
  carry loss; a batch of texts goes through the fast tokenizer in one call (no special tokens, with
  offsets) and every span becomes the range of tokens overlapping it. Labels are kept as token
  ranges until the batch is flattened, so masking costs a few integer ops per record.
- alpaca, alpaca_format "alpaca": Axolotl's alpaca prompt, character for character: its preamble ("Below
  is an instruction that describes a task...", one wording with an input, one without), then
  `### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n` + output, then EOS (trained,
  exactly once). A record with a system text gets Axolotl's system variant (`alpaca_w_system`):
  `### System:\\n...\\n\\n` in place of the preamble.
- alpaca, alpaca_format "chat_template": [system?, user: instruction[\\n\\ninput], assistant: output]
  through the chat strategy.
- chat: any Hugging Face chat template, with no per-template code. The conversation is rendered once;
  a message's content is the part of that render which changes when only its content is replaced by a
  sentinel, the message kept in its place (as Axolotl 0.19 locates turns). So headers and trailers (role
  markers, Llama-2's " [/INST]") stay untrained, and a template that renders a turn by its position
  (Qwen 3's thinking block on the last answer only, Command A, Mistral v2/v3) is masked as rendered.
  A trained turn keeps its end-of-turn token: the special token right after its content, whitespace
  aside (<|im_end|>, <|eot_id|>, </s>); whitespace the template puts after it separates turns and stays
  untrained (generation stops at the special token). Which turns and end-of-turn tokens carry labels
  (roles_to_train, train_on_eos) is tokenize's setting unless the record's dataset overrides it
  (data.datasets[].roles_to_train / train_on_eos). A template that rewrites a content (e.g. upper-cases
  it) is refused with an error naming it, never masked by guesswork; one that drops a message (a system
  message it has no place for) leaves that message untrained.
- completion: the raw text then EOS, all trained; a document longer than sequence_len is cut into
  sequence_len chunks, each its own sequence (the BOS only in the first).
- BOS exactly once, and only where the tokenizer adds one itself (a probe finds what it adds in
  front of a text); a chat template that writes the BOS itself does not get a second.
- labels[0] of every sequence is -100: nothing in its own sequence precedes it, and in a packed row
  the previous position belongs to another sequence, so a label there would train across documents.
- Length policy for alpaca and chat (sequence_len): excess_length drop (counted), truncate (cut,
  counted) or error (TokenizeError naming source:line). A sequence left with no trained token (e.g. the
  cut removed the response, or no turn has a role in roles_to_train) is dropped and counted.

Trade-offs
- The prompt and the response are tokenized as one text, as the model reads them. Tokenizing them
  apart would give the response a spurious leading space on SentencePiece tokenizers. The cost: a
  token that straddles the prompt/response boundary is trained (never the case after the newline or
  special token that ends every built-in prompt).
- The chat strategy renders the whole conversation once per message it labels (trained turns, or all
  with train_on_eos all), plus once: slower than a per-template regex (benchmarks/bench_tokenize.py
  measures the whole stage against bare tokenization), but right for any template.
- Text that spells a special token (e.g. "</s>") is read as that special token, as everywhere in
  Hugging Face tokenization by default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import jinja2

from reprotune.config.sections import TokenizeConfig
from reprotune.errors import BadInput
from reprotune.packed import IGNORE_INDEX

# Private-use code points: never in real text, never stripped by a template's `| trim`.
SENTINEL = "\ue000reprotune-content\ue001"


class TokenizeError(BadInput):
    """Records cannot be tokenized as configured (a record too long under excess_length error, a
    tokenizer or chat template unfit for label masking): bad input, the stage exits 2."""


class Sequence(NamedTuple):
    input_ids: list[int]
    trained: tuple[tuple[int, int], ...]
    """Token ranges [start, end) carrying labels, sorted, disjoint, never including position 0."""

    @property
    def n_trained(self) -> int:
        return sum(b - a for a, b in self.trained)

    def labels(self) -> list[int]:
        labels = [IGNORE_INDEX] * len(self.input_ids)
        for a, b in self.trained:
            labels[a:b] = self.input_ids[a:b]
        return labels

    def cut(self, start: int, end: int) -> Sequence:
        """Tokens [start, end) as a sequence of their own."""
        return make_sequence(self.input_ids[start:end], [(a - start, b - start) for a, b in self.trained])


def make_sequence(ids: list[int], ranges) -> Sequence:
    """A Sequence with `ranges` clipped to [1, len(ids)) (position 0 is never a target)."""
    clipped = ((max(a, 1), min(b, len(ids))) for a, b in ranges)
    return Sequence(ids, tuple((a, b) for a, b in clipped if a < b))


class Rendered(NamedTuple):
    text: str
    spans: list[tuple[int, int]]
    """Character ranges [start, end) of `text` that carry labels."""
    add_eos: bool
    """Append the EOS token (trained): alpaca and completion; chat templates end turns themselves."""
    chunk: bool
    """Split into sequence_len chunks instead of applying excess_length (completion)."""


@dataclass
class Encoded:
    """One batch of records as sequences, in record order."""

    sequences: list[Sequence] = field(default_factory=list)
    record: list[int] = field(default_factory=list)
    """Index in the batch of each sequence's record."""
    counts: Counter = field(default_factory=Counter)
    """dropped_too_long, truncated, dropped_no_trainable."""


# Axolotl's AlpacaPrompter (src/axolotl/prompters.py): the preamble depends on whether there is an input.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_prompt(system: str | None, instruction: str, input_: str | None) -> str:
    """Axolotl's alpaca prompt, ending with the response header; with a system text, its alpaca_w_system
    variant (the record's system text replaces the preamble)."""
    if system:
        parts = [f"### System:\n{system}\n\n"]
    else:
        parts = [f"{ALPACA_PREAMBLE if input_ else ALPACA_PREAMBLE_NO_INPUT}\n\n"]
    parts.append(f"### Instruction:\n{instruction}\n\n")
    if input_:
        parts.append(f"### Input:\n{input_}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def alpaca_messages(record: dict) -> list[dict]:
    """An alpaca record as a [system?, user, assistant] conversation."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    system = [{"role": "system", "content": record["system"]}] if record["system"] else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of a text by itself (usually [bos] or [])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    raise TokenizeError(f"tokenizer {tokenizer.name_or_path!r}: cannot find the text among its special tokens")


class ChatMasking(NamedTuple):
    """Which chat turns carry labels: the roles trained, and train_on_eos (turn | last | all | none)."""

    roles: frozenset[str]
    train_on_eos: str


class PromptEncoder:
    """Records -> Sequences for one tokenizer and one `tokenize` config.

    `masking` maps a record's `dataset` index to that dataset's ChatMasking where it differs from cfg's.
    """

    def __init__(self, tokenizer, cfg: TokenizeConfig, masking: dict[int, ChatMasking] | None = None):
        name = tokenizer.name_or_path
        if not tokenizer.is_fast:
            raise TokenizeError(f"tokenizer {name!r} has no fast (Rust) version; offsets need one")
        if tokenizer.eos_token_id is None:
            raise TokenizeError(f"tokenizer {name!r} has no EOS token")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prefix = special_prefix(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.masking = masking or {}
        self.default_masking = ChatMasking(frozenset(cfg.roles_to_train), cfg.train_on_eos)
        added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        # longest first: a token that ends with a shorter one ("<|im_end|>" vs ">") is found whole
        self.specials = tuple(sorted({*tokenizer.all_special_tokens, *added}, key=lambda s: (-len(s), s)))

    # ------------------------------------------------------------------ batch

    def encode(self, records: list[dict]) -> Encoded:
        """Sequences of `records` (dicts with the validated columns), length policy applied."""
        rendered = [self.render(r) for r in records]
        encodings = self.tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
        out = Encoded()
        for i, (record, r, enc) in enumerate(zip(records, rendered, encodings)):
            for seq in self._fit(self._sequence(r, enc), r.chunk, record, out.counts):
                out.sequences.append(seq)
                out.record.append(i)
        return out

    def _sequence(self, r: Rendered, enc) -> Sequence:
        """Token ids and trained ranges of one rendered record: [BOS] + text tokens + [EOS]."""
        ids = enc.ids
        lead = self.prefix if ids[: len(self.prefix)] != self.prefix else []
        ranges = [
            (a + len(lead), b + len(lead))
            for a, b in filter(None, (_token_range(enc, s, e, len(r.text)) for s, e in r.spans))
        ]
        tail = [self.eos] if r.add_eos else []
        ids = lead + ids + tail
        if tail:
            ranges.append((len(ids) - 1, len(ids)))
        return make_sequence(ids, _merge(ranges))

    def _fit(self, seq: Sequence, chunk: bool, record: dict, counts: Counter) -> list[Sequence]:
        """Apply the length policy; drop (and count) sequences left without a trained token."""
        n, limit = len(seq.input_ids), self.cfg.sequence_len
        if chunk:
            parts = [seq.cut(s, s + limit) for s in range(0, n, limit)]
        elif n <= limit:
            parts = [seq]
        elif self.cfg.excess_length == "error":
            raise TokenizeError(
                f"{record['source']}:{record['line']}: {n} tokens, over tokenize.sequence_len "
                f"{limit} (tokenize.excess_length is error)"
            )
        elif self.cfg.excess_length == "drop":
            counts["dropped_too_long"] += 1
            return []
        else:
            counts["truncated"] += 1
            parts = [seq.cut(0, limit)]
        kept = [p for p in parts if p.n_trained]
        counts["dropped_no_trainable"] += len(parts) - len(kept)
        return kept

    # ------------------------------------------------------------------ rendering

    def render(self, record: dict) -> Rendered:
        """The text of one record and the character spans that carry labels."""
        kind = record["type"]
        if kind == "completion":
            return Rendered(record["text"], [(0, len(record["text"]))], add_eos=True, chunk=True)
        if kind == "chat":
            return self._chat(record["messages"], record)
        if self.cfg.alpaca_format == "chat_template":
            return self._chat(alpaca_messages(record), record)
        prompt = alpaca_prompt(record["system"], record["instruction"], record["input"])
        text = prompt + record["output"]
        start = 0 if self.cfg.train_on_inputs else len(prompt)
        return Rendered(text, [(start, len(text))], add_eos=True, chunk=False)

    def _chat(self, messages: list[dict], record: dict) -> Rendered:
        full = self._apply(messages, record)
        if self.cfg.train_on_inputs:
            return Rendered(full, [(0, len(full))], add_eos=False, chunk=False)
        roles, train_on_eos = self.masking.get(record.get("dataset"), self.default_masking)
        trained = [i for i, m in enumerate(messages) if m["role"] in roles]
        located = {  # message index -> its content span (None: the template does not render it)
            i: self._content_span(messages, i, full, record)
            for i in range(len(messages))
            if i in trained or train_on_eos == "all" or i == len(messages) - 1  # the last: the closing token
        }
        last = located[len(messages) - 1]
        # the tokens that end a turn: EOS, and the one closing the conversation's last turn (<|im_end|>,
        # <|eot_id|>); a special token after a content that closes no turn opens the next one ([/INST] on
        # Mistral's tokenizers, <|im_start|> in a template without <|im_end|>) and stays untrained
        closers = {self.tokenizer.eos_token, *([self._special_after(full, last[1])[1]] if last else [])} - {None}
        spans = []
        for i, content in located.items():  # in message order
            if content is None:
                continue  # the template does not render this message (e.g. a system message it drops)
            if i in trained:
                spans.append(content)
            eot = self._end_of_turn(full, content[1], closers)
            if eot and _trains_end_of_turn(train_on_eos, i, trained):
                spans.append(eot)
        return Rendered(full, _merge(spans), add_eos=False, chunk=False)

    def _apply(self, messages: list[dict], record: dict) -> str:
        if not self.tokenizer.chat_template:
            raise TokenizeError(
                f"{record['source']}:{record['line']}: tokenizer {self.tokenizer.name_or_path!r} has no chat template"
            )
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except jinja2.TemplateError as e:
            raise TokenizeError(
                f"{record['source']}:{record['line']}: chat template of {self.tokenizer.name_or_path!r} failed: {e}"
            ) from e

    def _content_span(self, messages: list[dict], i: int, full: str, record: dict) -> tuple[int, int] | None:
        """Characters of message i's content in `full`: the part of the render that changes when only that
        content is replaced by a sentinel, the message kept in its place (so a template that renders a turn
        differently by position, e.g. Qwen 3's thinking block on the last answer only, is read as rendered).
        None when the template does not render the message at all."""
        probe = self._apply([*messages[:i], {**messages[i], "content": SENTINEL}, *messages[i + 1 :]], record)
        if probe == full:
            return None
        start = _common_prefix(full, probe, min(len(full), len(probe)))
        tail = _common_prefix(full[start:][::-1], probe[start:][::-1], min(len(full), len(probe)) - start)
        # the differing part holds the sentinel, once: a template that rewrites the content loses it, one that
        # renders the content elsewhere too (an echo) shows it twice. Other text may differ around it: Qwen 3
        # moves a `<think>...</think>` block out of an answer's content and renders it before the rest
        if probe.count(SENTINEL) != 1 or probe.find(SENTINEL, start, len(probe) - tail) < 0:
            raise TokenizeError(
                f"{record['source']}:{record['line']}: chat template of {self.tokenizer.name_or_path!r} "
                f"does not render a {messages[i]['role']!r} message's content once, as written (it rewrites it, or "
                "renders other text by it), so its labels cannot be located; remove that role from "
                "tokenize.roles_to_train (and train_on_eos all), or use train_on_inputs"
            )
        return start, len(full) - tail

    def _end_of_turn(self, full: str, content_end: int, closers: set[str]) -> tuple[int, int] | None:
        """Characters of the token that closes a turn whose content ends at `content_end`: the special token
        right after it, whitespace aside, when it is one of `closers` (<|im_end|>, </s>, <|eot_id|>); None
        where plain text follows (the " [/INST]" after a Llama-2 user turn) or a token that opens the next
        turn. Whitespace after the token stays untrained: generation stops at the token."""
        at, closing = self._special_after(full, content_end)
        return (at, at + len(closing)) if closing in closers else None

    def _special_after(self, full: str, content_end: int) -> tuple[int, str | None]:
        """Where the text after `content_end` resumes, whitespace aside, and the special token there (the
        longest that matches), or None."""
        rest = full[content_end:]
        at = content_end + len(rest) - len(rest.lstrip())
        if not full.startswith(self.specials, at):  # one test over all of them (Llama-3 has 256) first
            return at, None
        return at, next(s for s in self.specials if full.startswith(s, at))


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit`: a binary search over slice
    comparisons (memcmp in C), since a character loop in Python costs more than the render it reads."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _trains_end_of_turn(train_on_eos: str, i: int, trained: list[int]) -> bool:
    """Whether turn i's closing token carries a label (`trained`: the turns whose role is trained, in order)."""
    if train_on_eos == "all":
        return True
    if train_on_eos == "none" or i not in trained:
        return False
    return train_on_eos == "turn" or i == trained[-1]  # "last": only the last trained turn's


def _token_range(enc, start: int, end: int, n_chars: int) -> tuple[int, int] | None:
    """Tokens overlapping characters [start, end) of the encoded text, or None if none do."""
    first = next((t for c in range(start, end) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return None
    if end == n_chars:
        return first, len(enc)
    last = next(t for c in range(end - 1, start - 1, -1) if (t := enc.char_to_token(c)) is not None)
    # char_to_token names the first token of a character; the bytes of one character can span several
    while last + 1 < len(enc) and enc.token_to_chars(last + 1)[0] < end:
        last += 1
    return first, last + 1


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with touching or overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out

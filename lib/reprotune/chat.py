"""`reprotune chat`: talk to a tuned model in the terminal, the first thing people do after a run.

Features
- MODEL is a model folder (default models/export; models/merged or models/base work too), loaded as
  served: safetensors only, its own chat template, its stop tokens (EOS and every eos_token_id of its
  generation_config.json, end of turn included). `--adapter` instead puts models/adapter on models/base
  in 4 bits, as training loaded it (the "as trained" model of the evaluate stage; the quantization and
  dtype settings come from the adapter's training_config.json).
- Multi-turn: each answer joins the history; `--system` opens every conversation with a system message.
- Greedy by default (the answer evaluate scores); `--temperature` > 0 samples, with `--top-p` and `--seed`.
- Answers stream token by token. Ctrl-C during an answer stops that answer (what was said stays in the
  history), not the session; Ctrl-C or Ctrl-D at the prompt, or `/exit`, ends it; `/reset` clears the history.
- `--compare`: every message answered by the base (models/base) and the tuned model, one after the other,
  each with its own history.
- Scripts: `--prompt "..."` (repeatable) or prompts on standard input (one per line, when it is not a
  terminal) print `> prompt` and each answer, and exit; one conversation unless `--each`.
- A model folder that cannot be loaded is one line and exit 2 (files.py's checks), never a traceback.

Trade-offs
- Plain PyTorch generation through transformers' `generate`, one sequence at a time: enough for a
  conversation; the served model's speed is llama.cpp's or vLLM's business (models/export has a GGUF).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reprotune import layout
from reprotune.errors import BadInput
from reprotune.files import read_json_object

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class Speaker:
    """A loaded model that answers, with its own conversation."""

    name: str
    model: object
    tokenizer: object
    stops: list[int]
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int = 0


def load_folder(folder: Path, name: str) -> Speaker:
    """A model folder as served (models/export, models/merged, models/base)."""
    from transformers import AutoTokenizer

    from reprotune.loading import load_model, read_config, stop_token_ids, stored_dtype

    folder = Path(folder)
    _check_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, stored_dtype(read_config(folder)) or "float32", trust_remote_code=False)
    return _speaker(name, model, tokenizer, stop_token_ids(folder, tokenizer))


def _speaker(name: str, model, tokenizer, stops: set[int]) -> Speaker:
    """The model with a generation config of its stop tokens only: a folder's own generation_config.json
    (a hub model's repetition penalty, top-k, sampling) would otherwise bend every answer; here greedy is
    greedy, and sampling is what the options say."""
    from transformers import GenerationConfig

    stops = sorted(stops)
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=stops[0])
    return Speaker(name, model, tokenizer, stops)


def load_adapter(base: Path, adapter: Path) -> Speaker:
    """models/adapter on models/base, as training loaded it (4-bit under QLoRA)."""
    from transformers import AutoTokenizer

    from reprotune.config.sections import QuantConfig, TrainConfig
    from reprotune.loading import stop_token_ids
    from reprotune.quant import load_as_trained

    _check_folder(base)
    config = Path(adapter) / "training_config.json"
    trained = read_json_object(config).get("params")
    if not isinstance(trained, dict):
        raise BadInput(f"{config}: has no params record (an adapter written by the train stage has one)")
    quant, train = (
        _section(cls, section, trained) for section, cls in (("quant", QuantConfig), ("train", TrainConfig))
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = load_as_trained(base, adapter, quant, train, trust_remote_code=False)
    return _speaker("as trained", model, tokenizer, stop_token_ids(base, tokenizer))


def _section(cls, section: str, trained: dict):
    """A params section from the adapter's record of what training read, in today's keys: a key added since
    takes its schema default, one removed since is left out."""
    import dataclasses

    from reprotune.config.check import fill_defaults, schema

    known = {f.name for f in dataclasses.fields(cls)}
    given = {k.split(".", 1)[1]: v for k, v in trained.items() if k.startswith(f"{section}.")}
    filled = fill_defaults({section: {k: v for k, v in given.items() if k in known}}, schema())[section]
    return cls(**filled)


def _check_folder(folder: Path) -> None:
    """A model folder whose files load (files.check_model_folder's checks), or BadInput naming it."""
    from reprotune.files import check_model_folder

    if not folder.is_dir():
        raise BadInput(f"{folder}: no model folder there (run the pipeline first: `dvc repro`)")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise BadInput(f"{folder}: not a model folder (config.json and *.safetensors weights)")
    check_model_folder(folder, names)


def answer(speaker: Speaker, message: str, sampling: Sampling, write: Callable[[str], None]) -> str:
    """The speaker's answer to `message` after its history, written piece by piece as it is generated;
    both join the history. Ctrl-C stops the answer where it is."""
    import jinja2
    import torch

    try:
        ids = prompt_ids(speaker.tokenizer, [*speaker.history, {"role": "user", "content": message}])
    except jinja2.TemplateError as e:  # e.g. a system message to a template without a system role
        write(f"[the chat template refused the conversation: {e}]")
        return ""
    speaker.history.append({"role": "user", "content": message})
    streamer = _Streamer(speaker.tokenizer, write)
    kwargs = {"do_sample": False}
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
        kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    try:
        with torch.no_grad():
            speaker.model.generate(
                input_ids=torch.tensor([ids], device=speaker.model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=speaker.model.device),
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=speaker.stops,
                pad_token_id=speaker.stops[0],
                streamer=streamer,
                **kwargs,
            )
    except KeyboardInterrupt:
        streamer.end()
        write(" [stopped]")
    text = streamer.text()
    speaker.history.append({"role": "assistant", "content": text})
    return text


def prompt_ids(tokenizer, history: list[dict]) -> list[int]:
    """The conversation as the model is served: through its chat template with the generation prompt (a
    tokenizer without one: the last message as plain text)."""
    if not tokenizer.chat_template:
        return tokenizer.encode(history[-1]["content"])
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


class _Streamer:
    """transformers' streamer interface: the prompt first (skipped), then each new token. Writes the text
    as it grows, decoded from all tokens so far (a character split over tokens is written once whole)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate sends the prompt first
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.text()
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait for a whole character
            self.write(text[len(self.shown) :])
            self.shown = text

    def end(self) -> None:
        text = self.text()
        # a tokenizer whose decode changes earlier text as later tokens come: write what is not yet shown
        common = len(os.path.commonprefix([text, self.shown]))
        self.write(text[common:])
        self.shown = text

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def converse(speakers: list[Speaker], messages: Iterable[str], sampling: Sampling, system: str | None,
             out=None, each: bool = False, echo: bool = True) -> None:  # fmt: skip
    """Answer each message with every speaker, writing to `out` (standard output). `each`: a fresh
    conversation per message."""
    out = out or sys.stdout
    opening = [{"role": "system", "content": system}] if system else []
    for speaker in speakers:
        speaker.history = list(opening)
    for message in messages:
        if message.strip() in EXIT_COMMANDS:
            return
        if message.strip() == "/reset":
            for speaker in speakers:
                speaker.history = list(opening)
            out.write("(history cleared)\n")
            continue
        if echo:
            out.write(f"> {message}\n")
        for speaker in speakers:
            if each:
                speaker.history = list(opening)
            if len(speakers) > 1:
                out.write(f"[{speaker.name}] ")
            answer(speaker, message, sampling, lambda piece: (out.write(piece), out.flush()))
            out.write("\n")
        out.flush()


def typed_lines(prompt: str = "you> ") -> Iterable[str]:
    """Messages typed at the terminal; Ctrl-C or Ctrl-D at the prompt ends the session."""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip():
            yield line


def run(model: Path | None, adapter: bool, compare: bool, prompts: list[str], system: str | None,
        sampling: Sampling, each: bool) -> int:  # fmt: skip
    """`reprotune chat`: load the speakers, then talk (interactively, or the prompts given)."""
    if adapter:
        tuned = load_adapter(layout.BASE, layout.ADAPTER)
    else:
        tuned = load_folder(model or layout.EXPORT, "tuned")
    speakers = [load_folder(layout.BASE, "base"), tuned] if compare else [tuned]
    if prompts:
        messages, echo = prompts, True
    elif not sys.stdin.isatty():
        messages, echo = (line.rstrip("\n") for line in sys.stdin if line.strip()), True
    else:
        print("reprotune chat: Ctrl-C stops an answer; /reset clears the history; /exit or Ctrl-D ends.")
        messages, echo = typed_lines(), False
    converse(speakers, messages, sampling, system, each=each, echo=echo)
    return 0

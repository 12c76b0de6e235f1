"""`reprotune chat` on the built-in model: greedy answers through the chat template that stop at the stop
tokens, multi-turn history, Ctrl-C stopping one answer and not the session, the scripted forms, a bad
model folder as one line and exit 2, and a real terminal (tmux) session."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reprotune import cli
from reprotune.chat import Sampling, answer, converse, load_folder, prompt_ids
from reprotune.generate import greedy_batch

BIN = Path(sys.executable).parent
SHORT = Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def speaker(tiny_model_dir):
    return load_folder(tiny_model_dir, "tuned")


def test_an_answer_is_the_greedy_continuation_through_the_chat_template(speaker):
    pieces = []
    text = answer(speaker, "What is 2 + 3?", SHORT, pieces.append)
    [ids] = greedy_batch(speaker.model, [prompt_ids(speaker.tokenizer, speaker.history[:1])], 6, set(speaker.stops))
    assert text == "".join(pieces) == speaker.tokenizer.decode(ids, skip_special_tokens=True)
    assert speaker.history[-1] == {"role": "assistant", "content": text}


def test_each_message_follows_the_conversation_so_far(speaker):
    out = io.StringIO()
    converse([speaker], ["Hi.", "And then?"], SHORT, system="Answer briefly.", out=out)
    assert [m["role"] for m in speaker.history] == ["system", "user", "assistant", "user", "assistant"]
    second = prompt_ids(speaker.tokenizer, speaker.history[:4])
    assert speaker.tokenizer.decode(second).count("Hi.") == 1  # the first exchange is in the second prompt
    assert out.getvalue().startswith("> Hi.\n")


def test_ctrl_c_stops_the_answer_not_the_session(speaker):
    written = []

    def interrupted(piece):
        written.append(piece)
        if len(written) == 1:
            raise KeyboardInterrupt  # as a Ctrl-C during generation arrives

    speaker.history = []
    whole = answer(speaker, "Count to ten.", Sampling(max_new_tokens=20), lambda piece: None)
    speaker.history = []
    cut = answer(speaker, "Count to ten.", Sampling(max_new_tokens=20), interrupted)
    assert written[-1] == " [stopped]" and len(cut) < len(whole) and whole.startswith(cut)
    assert speaker.history[-1]["content"] == cut  # what was said stays in the conversation
    after = answer(speaker, "Again.", SHORT, written.append)  # the session goes on
    assert speaker.history[-2:] == [{"role": "user", "content": "Again."}, {"role": "assistant", "content": after}]


def test_compare_answers_with_the_base_then_the_tuned_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    for name in ("base", "export"):
        (tmp_path / "models" / name).symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["chat", "--compare", "--prompt", "Hi.", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> Hi." and lines[1].startswith("[base] ") and lines[2].startswith("[tuned] ")
    assert lines[1].removeprefix("[base] ") == lines[2].removeprefix("[tuned] ")  # here the same model


def test_adapter_as_trained(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """models/adapter on the 4-bit base, with the quantization its training_config.json records."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from reprotune.quant import load_as_trained
    from reprotune.train.run import params_read

    from helpers import SHIPPED

    (tmp_path / "models").mkdir()
    (tmp_path / "models/base").symlink_to(tiny_model_dir)
    adapter = tmp_path / "models/adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, init_lora_weights=False)
    )
    model.save_pretrained(adapter)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (adapter / name).write_bytes((tiny_model_dir / name).read_bytes())
    (adapter / "training_config.json").write_text(json.dumps({"params": params_read(SHIPPED)}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["chat", "--adapter", "--prompt", "Hi.", "--max-new-tokens", "5"]) == 0
    said = capsys.readouterr().out.splitlines()[1]
    trained = load_as_trained(tiny_model_dir, adapter, SHIPPED.quant, SHIPPED.train, False)
    speaker = load_folder(tiny_model_dir, "tuned")
    prompt = prompt_ids(speaker.tokenizer, [{"role": "user", "content": "Hi."}])
    [ids] = greedy_batch(trained, [prompt], 5, set(speaker.stops))
    assert said == speaker.tokenizer.decode(ids, skip_special_tokens=True)


def test_scripted_prompts_and_a_bad_folder(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["chat", str(tiny_model_dir), "--prompt", "Hi.", "--prompt", "Bye.", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("> Hi.\n") and "\n> Bye.\n" in printed
    assert cli.main(["chat", str(tmp_path / "none"), "--prompt", "Hi."]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"{tmp_path / 'none'}: no model folder there (run the pipeline first: `dvc repro`)"
    )


def test_prompts_on_standard_input(tiny_model_dir):
    command = [str(BIN / "reprotune"), "chat", str(tiny_model_dir), "--max-new-tokens", "3", "--each"]
    result = subprocess.run(command, input="One?\nTwo?\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith(">")] == ["> One?", "> Two?"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_terminal_session(tiny_model_dir, tmp_path):
    """Typed as a person would: a question, its streamed answer, the next prompt; Ctrl-D ends it."""
    session = f"reprotune-chat-{time.monotonic_ns()}"
    command = f"{BIN / 'reprotune'} chat {tiny_model_dir} --max-new-tokens 4; echo chat-exited-$?"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", "bash --norc"], check=True)
    subprocess.run(["tmux", "send-keys", "-t", session, command, "Enter"], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(predicate, seconds: float = 120) -> str:
        deadline = time.monotonic() + seconds
        while not predicate(text := screen()):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        return text

    try:
        wait_for(lambda s: "you>" in s.split("chat-exited")[-1])  # the pane drops trailing spaces
        subprocess.run(["tmux", "send-keys", "-t", session, "What is 2 + 3?", "Enter"], check=True)
        shown = wait_for(lambda s: s.count("you>") == 2)  # answered, asking again
        assert "you> What is 2 + 3?" in shown
        subprocess.run(["tmux", "send-keys", "-t", session, "C-d"], check=True)
        wait_for(lambda s: "chat-exited-0" in s)  # the echo after it, not the typed command line's `-$?`
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

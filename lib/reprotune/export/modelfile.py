"""Ollama's Modelfile for the exported GGUF: FROM, TEMPLATE, SYSTEM and a stop parameter per stop token.

- Stops: the tokenizer's EOS and every eos_token_id of the generation config (what transformers'
  generation stops at), by their text; ChatML also stops at <|im_start|>, as Ollama's own ChatML
  template does, so a reply never runs into a new turn.
- TEMPLATE: Ollama's templates are Go templates, not Jinja, so a chat template is translated only
  where the translation is known exactly: ChatML (the built-in model's, SmolLM's, Qwen's), detected
  by rendering a probe conversation. Other templates get a comment instead: Ollama then falls back to
  the chat template the GGUF carries (tokenizer.chat_template) for the templates it recognises.
- SYSTEM: the system message the chat template puts in when a conversation has none (SmolLM2's
  "You are a helpful AI assistant named SmolLM..."): the model was trained with it, so it is served with it.
"""

from __future__ import annotations

# Ollama's built-in ChatML template (template/chatml.gotmpl): multi-turn messages, or a single prompt.
CHATML_GO_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{- end }}"""
PROBE = "\ue000probe\ue001"  # private-use characters: never part of a template's own text
SYSTEM_HEADER, END = "<|im_start|>system\n", "<|im_end|>"


def render_modelfile(gguf_file: str, tokenizer, stop_ids: set[int]) -> str:
    """The Modelfile text for `gguf_file` (a name in the same folder)."""
    chatml = is_chatml(tokenizer)
    lines = [f"FROM ./{gguf_file}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        system = default_system_message(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: this chat template has no exact Go translation here; Ollama uses the GGUF's")
    stops = sorted(tokenizer.convert_ids_to_tokens(sorted(stop_ids))) + (["<|im_start|>"] if chatml else [])
    lines += [f"PARAMETER stop {_quoted(text)}" for text in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def is_chatml(tokenizer) -> bool:
    """True when the chat template renders a user turn exactly as ChatML does."""
    if not tokenizer.chat_template:
        return False
    text = _render(tokenizer, [{"role": "user", "content": PROBE}])
    return text.endswith(f"<|im_start|>user\n{PROBE}{END}\n<|im_start|>assistant\n")


def default_system_message(tokenizer) -> str | None:
    """The system message a ChatML template injects into a conversation that has none."""
    text = _render(tokenizer, [{"role": "user", "content": PROBE}])
    if not text.startswith(SYSTEM_HEADER):
        return None
    return text[len(SYSTEM_HEADER) : text.index(END)]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

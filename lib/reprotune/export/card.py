"""README.md model card of the export folder: where the model came from, exactly.

Sections: Hugging Face front matter (library, base_model for hub bases, tags); the base model
with its pinned revision and commit; each training data file with its SHA-256; the files of the
folder; metrics from the stages' metrics/*.json; the complete params (defaults filled in) as YAML; the
reprotune version and how to reproduce.

Privacy: the finished text is scrubbed before it is written (`scrub`): values of secret-named
environment variables (*TOKEN*, *SECRET*, *PASSWORD*, *KEY*, ...), anything shaped like a Hugging
Face token (hf_ + 20 or more letters/digits), and absolute paths (POSIX, ~/ and Windows), which
keep only their last component. The card is published with the model, so it must not leak a
token or a machine's layout, whatever a user put in params or data paths.

Reproducibility: the card quotes the stages' result metrics only (metrics/<stage>.json). What depends on
the machine or the moment (seconds, peak memory, throughput, device) and the merge check's logit figures,
which carry float rounding noise, are in metrics/runtime/ (see reprotune.stage), never in the card. So the
same inputs give a byte-identical card (and manifest).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import yaml

from reprotune.config import Params
from reprotune.config.sections import SECTIONS

HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE|CREDENTIAL|AUTH", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would scrub ordinary words
# An absolute path not inside a URL, a relative path or a tag like </s>: not after a word char . : / ~ < -
ABS_PATH = re.compile(r"(?<![\w.:/~<-])(?:~?/|[A-Za-z]:\\)[^\s`'\"|<>()\[\]]+")


def scrub(text: str, env: dict[str, str] | None = None) -> str:
    """`text` without secret-named environment values, HF tokens and absolute paths."""
    env = os.environ if env is None else env
    secrets = sorted(
        (v for k, v in env.items() if SECRET_ENV.search(k) and len(v) >= MIN_SECRET_LEN), key=len, reverse=True
    )  # longest first: a secret containing another goes whole
    for value in secrets:
        text = text.replace(value, "<redacted>")
    text = HF_TOKEN.sub("<redacted>", text)
    return ABS_PATH.sub(lambda m: "<local>/" + re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], text)


def params_dict(params: Params) -> dict:
    """All params sections as plain data (lists, not tuples) in schema order."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return {name: plain(dataclasses.asdict(getattr(params, name))) for name in SECTIONS}


def flat_metrics(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """(stage.key.path, value) rows of numbers/strings/bools."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value):
                walk(f"{prefix}.{k}", value[k])
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.6g}"))
        elif isinstance(value, (int, str, bool)) or value is None:
            rows.append((prefix, json.dumps(value)))

    for stage in sorted(metrics):
        walk(stage, metrics[stage])
    return rows


def results_rows(evaluate: dict) -> list[str]:
    """The headline figures, base beside the shipped model: task accuracy and what the base knew (retention)."""
    base, shipped = evaluate.get("base"), evaluate.get("as_shipped")
    if not base or not shipped:
        return []
    rows = ["| | base | this model |", "| --- | --- | --- |",
            f"| validation loss | {base['loss']} | {shipped['loss']} |",
            f"| exact match (of {shipped['generated']} validation answers) | {base['exact_match_count']} | "
            f"{shipped['exact_match_count']} |"]  # fmt: skip
    kept = evaluate.get("retention")
    if kept:
        rows += [
            f"| retention: NLL of the base's own answers to {kept['prompts']} general prompts | "
            f"{kept['base']['nll']} | {kept['as_shipped']['nll']} |",
            f"| retention: answers beginning as the base's (first {kept['prefix_tokens']} tokens) | "
            f"{kept['base']['begins_as_base_count']} | {kept['as_shipped']['begins_as_base_count']} |",
        ]
    return rows + [""]


def model_title(model: str) -> str:
    """Short name of a base model: org/name -> name, builtin:tiny-llama -> tiny-llama."""
    return re.split(r"[/:]", model.rstrip("/"))[-1]


def render_card(
    params: Params, provenance: dict, data_files: list[dict], files: list[str], metrics: dict[str, dict], version: str
) -> str:
    """The scrubbed README.md text."""
    model = provenance.get("model", params.base.model)
    title = model_title(model)
    tags = ["reprotune", "lora", "peft"] + (["qlora"] if params.quant.load_in_4bit else [])
    front = {"library_name": "transformers", "tags": tags}
    if provenance.get("source") == "hub":
        front["base_model"] = model
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}, fine-tuned with reprotune",
        "",
        f"A LoRA fine-tune of `{model}` merged into its weights, produced by the reprotune {version} "
        "DVC pipeline (validate, tokenize, train, merge, evaluate, export). Every input below is pinned, "
        "so `dvc repro` with these params, data and base gives these files again.",
        "",
        "## Base model",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| model | `{model}` |",
        f"| source | {provenance.get('source', 'unknown')} |",
        f"| revision | {_code(provenance.get('revision'))} |",
        f"| commit | {_code(provenance.get('commit_sha'))} |",
        *_gguf_rows(provenance.get("gguf")),
        *([f"| warning | {provenance['warning']} |"] if provenance.get("warning") else []),
        "",
        "## Training data",
        "",
        "| file | type | sha256 |",
        "| --- | --- | --- |",
        *[f"| `{d['path']}` | {d['type']} | {_code(d['sha256'])} |" for d in data_files],
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "- `manifest.json`: SHA-256 of every other file; check with "
        "`python -c \"from reprotune.export.manifest import verify_manifest; verify_manifest('.')\"` "
        "or `sha256sum`.",
        "",
        "## Metrics",
        "",
        *results_rows(metrics.get("evaluate", {})),
    ]
    rows = flat_metrics(metrics)
    table = ["| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]]
    lines += table if rows else ["No metrics were found."]
    lines += [
        "",
        "## Params",
        "",
        "The complete params.yaml that produced this model, defaults filled in:",
        "",
        "```yaml",
        yaml.safe_dump(params_dict(params), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return scrub("\n".join(lines))


def _gguf_rows(gguf: dict | None) -> list[str]:
    """A GGUF base: the file's hash and what its tensors were quantized to."""
    if not gguf:
        return []
    types = ", ".join(f"{t} x{n}" for t, n in gguf["tensor_types"].items())
    return [f"| GGUF sha256 | {_code(gguf['sha256'])} |", f"| GGUF tensor types | {types} |"]


def _code(value: Any) -> str:
    return "none" if value is None else f"`{value}`"

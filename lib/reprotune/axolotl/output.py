"""Writing the import: params.yaml in the layout of the project's own (its comments kept), the report table,
and the README's key map."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import yaml

from reprotune.axolotl.keys import DATASET_KEYS, FSDP_KEYS, KEYS, PATTERNS
from reprotune.axolotl.rules import IGNORED, MAPPED, TRANSLATED, UNSUPPORTED, Row
from reprotune.axolotl.translate import params_from
from reprotune.config.check import check_params
from reprotune.config.sections import SECTIONS
from reprotune.errors import BadInput
from reprotune.files import read_yaml_mapping
from reprotune.io import atomic_file


def render(params: dict, template: Path) -> str:
    """`params` in the layout of `template` (a params.yaml): its comments and order, these values.
    Values equal to the template's are left as written there."""
    from ruamel.yaml import YAML

    ryaml = YAML()
    ryaml.width = 4096
    ryaml.preserve_quotes = True
    ryaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's layout
    ryaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    ryaml.representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _float(v)))
    doc = ryaml.load(template.read_text())
    for section, values in params.items():
        for key, value in values.items():
            if doc[section].get(key) != value:  # ruamel's round-trip types compare equal to plain ones
                doc[section][key] = _styled(value, flow=key not in ("datasets", "test_datasets"))
    buffer = io.StringIO()
    ryaml.dump(doc, buffer)
    return buffer.getvalue()


def _float(value: float) -> str:
    """A float both YAML 1.1 (PyYAML) and 1.2 (ruamel, DVC) read as a number: 1e-05 needs a dot."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _styled(value, flow: bool):
    """Lists and mappings in flow style ([a, b], {k: v}) inside a value, block style at the top of a
    block value (the datasets list: one entry per block); strings that YAML could misread are quoted."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, list):
        seq = CommentedSeq(_styled(v, flow=flow or isinstance(v, list)) for v in value)
        if flow:
            seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, _styled(v, flow=True)) for k, v in value.items())
        if flow:
            mapping.fa.set_flow_style()
        return mapping
    if isinstance(value, str) and not re.fullmatch(r"[\w./:-]+", value):
        return DoubleQuotedScalarString(value)
    return value


def table(rows: list[Row]) -> str:
    """The rows as aligned text columns: axolotl key, value, status, reprotune key, note."""
    shown = [("axolotl", "value", "status", "reprotune", "note")]
    shown += [(r.key, _short(r.value), r.status, r.target or "-", r.note) for r in rows]
    widths = [max(len(line[i]) for line in shown) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in shown)


def _short(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return text if len(text) <= 40 else text[:37] + "..."


def key_map_markdown() -> str:
    """The README's key map: every key and family this importer knows, from the same table it uses."""
    lines = ["| Axolotl key | status | reprotune | note |", "|---|---|---|---|"]
    for key, rule in KEYS.items():
        lines.append(f"| `{key}` | {rule.status} | {_code(rule.target)} | {rule.note} |")
    for pattern, rule in PATTERNS:
        lines.append(f"| keys matching `{pattern}` | {rule.status} | {_code(rule.target)} | {rule.note} |")
    for key, rule in DATASET_KEYS.items():
        target = rule.target and f"data.datasets[].{rule.target}"
        lines.append(f"| `datasets[].{key}` | {rule.status} | {_code(target)} | {rule.note} |")
    for key, rule in FSDP_KEYS.items():
        lines.append(f"| `fsdp_config.[fsdp_]{key}` | {rule.status} | {_code(rule.target)} | {rule.note} |")
    return "\n".join(lines)


def _code(target: str) -> str:
    return ", ".join(f"`{t.strip()}`" for t in target.split(",")) if target else "-"


def read_axolotl_config(source: Path) -> dict:
    """The Axolotl config in `source`, or BadInput naming the file: unreadable, empty, not YAML, not a
    mapping, or a reprotune params file given by mistake."""
    cfg = read_yaml_mapping(source, "an Axolotl config")
    if cfg and set(cfg) <= set(SECTIONS):
        raise BadInput(
            f"{source}: is a reprotune params file (sections {', '.join(cfg)}), not an Axolotl config; "
            "check it with `reprotune check`"
        )
    return cfg


def import_axolotl(source: Path, out: Path, template: Path, root: Path) -> int:
    """Write `out` from Axolotl config `source`; print the table and any check problems; the exit code."""
    from reprotune.config import EXIT_BAD_INPUT

    cfg = read_axolotl_config(source)
    params, rows = params_from(cfg)
    text = render(params, template)
    with atomic_file(out) as f:
        f.write(text)
    print(table(rows))
    counts = {s: sum(r.status == s for r in rows) for s in (MAPPED, TRANSLATED, IGNORED, UNSUPPORTED)}
    print(f"\n{len(rows)} keys: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; wrote {out}")
    if params["base"]["revision"] == "main" and not cfg.get("revision_of_model"):
        print(f"base.revision is main: pin it to a commit of {params['base']['model']} for a reproducible base")
    _, problems = check_params(yaml.safe_load(text), repo_root=root)
    if problems:
        print(f"{out} (from {source}): {len(problems)} problem(s) for `reprotune check`:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_BAD_INPUT if counts[UNSUPPORTED] or problems else 0


def write_key_map(readme: Path) -> None:
    """Replace the generated key map between its markers in `readme`."""
    text = readme.read_text()
    block = re.compile(r"(<!-- axolotl-key-map:start[^>]*-->\n)(.*?)(\n<!-- axolotl-key-map:end -->)", re.S)
    if not block.search(text):
        raise SystemExit(f"{readme}: no axolotl-key-map markers")
    with atomic_file(readme) as f:
        f.write(block.sub(lambda m: m.group(1) + key_map_markdown() + m.group(3), text))

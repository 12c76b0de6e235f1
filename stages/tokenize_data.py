"""Stage `tokenize`: data/validated/records.parquet -> data/packed/ (masked, split, packed rows).

Not named tokenize.py: `python stages/<any>.py` puts stages/ first on sys.path, where a tokenize.py
would shadow the standard library module of that name (imported by logging, linecache, inspect).
"""

from reprotune.layout import PACKED, metrics_file
from reprotune.stage import run_stage
from reprotune.tokenize.dataset import TokenizeInputs, tokenize


def report(m: dict) -> str:
    return (
        f"{m['records']} records -> {m['sequences']} sequences -> {m['bins']} rows "
        f"({100 * m['packing_efficiency']:.2f}% packed; dropped {m['dropped_too_long']} too long, "
        f"{m['dropped_no_trainable']} untrainable; truncated {m['truncated']})"
    )


if __name__ == "__main__":
    run_stage("tokenize", tokenize, TokenizeInputs(), out=PACKED, metrics=metrics_file("tokenize"), report=report)

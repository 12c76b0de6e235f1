"""`make gguf-check`: llama.cpp itself loads the exported GGUF files and must agree with transformers.

Files: f32, f16 and q8_0 GGUFs written by reprotune's writer from the exported safetensors folder
(models/export, or --export DIR) into a scratch folder, plus every *.gguf the folder already holds.
llama.cpp is llama-cpp-python 0.3.36 (llama.cpp 0c1e57098) built from its PyPI sdist into .venv-gguf
by the Makefile; it runs in its own process (benchmarks/gguf_llama_side.py). For each file:
- token ids of every text, llama.cpp's own pre-tokenizer probe text among them: must be equal;
- logits at every position against transformers on the folder (fp32): max |delta| must stay within
  rtol x max(1, max |logit|), rtol 1e-4 for f32 and 1e-2 for f16 (weights rounded to 11 bits), with
  llama.cpp's KV cache in f32 so that the file, not the cache's rounding, is checked;
  q8_0 is compared with the f32 file instead: share of positions whose top-1 token agrees (must be
  >= 0.9) and max |delta|, reported;
- greedy chat replies with the chat template applied (transformers: tokenizer.apply_chat_template and
  the generation config's stop tokens; llama.cpp: the GGUF's template and its EOS/EOT/EOM): f32 and f16
  replies must be the same text and both stop on a stop token; q8_0's are reported.
Prints a table and exits 1 on any failed check.

    python benchmarks/gguf_check.py --llama-python .venv-gguf/bin/python [--export models/export]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

try:
    import reprotune  # noqa: F401
except ImportError:  # running from a checkout without an install: use lib/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from reprotune import llama_cpp
from reprotune.export.gguf import write_gguf
from reprotune.loading import stop_token_ids

LLAMA_SIDE = Path(__file__).with_name("gguf_llama_side.py")
DTYPES = ("f32", "f16", "q8_0")
RTOL = {"f32": 1e-4, "f16": 1e-2}
MIN_TOP1_Q8 = 0.9
MAX_TOKENS = 24
TEXTS = [
    "### Instruction:\nAdd 12 and 30.\n\n### Response:\n42",
    "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. 3.14159, 2718!  Tabs\tand\nnew lines.",
]
CHATS = [
    [{"role": "user", "content": "Add 2 and 3."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Reverse the words: red green blue"}],
]


def transformers_side(folder: Path, texts: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stops = stop_token_ids(folder, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([i]), use_cache=False).logits[0].numpy() for i in ids]
    chats = [greedy_chat(model, tokenizer, messages, stops) for messages in CHATS]
    return {"ids": ids, "logits": logits, "chats": chats}


@torch.no_grad()
def greedy_chat(model, tokenizer, messages: list[dict], stops: set[int]) -> dict:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]  # BOS where the tokenizer adds one, as llama.cpp's add_bos_token says
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        token = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if token in stops:
            return {"text": tokenizer.decode(out, skip_special_tokens=True).strip(), "stopped": True}
        out.append(token)
    return {"text": tokenizer.decode(out, skip_special_tokens=True).strip(), "stopped": False}


def llama_side(llama_python: str, gguf_file: Path, texts: list[str], scratch: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=scratch))
    request = {"model": str(gguf_file), "texts": texts, "chats": CHATS, "max_tokens": MAX_TOKENS, "out": str(out)}
    proc = subprocess.run([llama_python, str(LLAMA_SIDE)], input=json.dumps(request), capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    answer = json.loads(proc.stdout)
    answer["logits"] = [np.load(out / f"logits-{i}.npy") for i in range(len(texts))]
    return answer


def compare(name: str, dtype: str, ref: dict, got: dict, f32: dict | None) -> tuple[dict, bool]:
    if "error" in got:
        return {"file": name, "error": got["error"]}, False
    ids_equal = [t["ids"] for t in got["texts"]] == ref["ids"]
    row = {"file": name, "pre": got["metadata"].get("tokenizer.ggml.pre"), "ids": "equal" if ids_equal else "DIFFER"}
    ok = ids_equal
    if ids_equal:
        deltas = [float(np.abs(a - b).max()) for a, b in zip(got["logits"], ref["logits"])]
        scale = max(1.0, max(float(np.abs(b).max()) for b in ref["logits"]))
        row["max_dlogit"], row["logit_scale"] = max(deltas), scale
        if dtype in RTOL:
            row["tolerance"] = RTOL[dtype] * scale
            ok &= row["max_dlogit"] <= row["tolerance"]
        if f32 is not None and dtype == "q8_0":
            agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(got["logits"], f32["logits"])])
            row["top1_vs_f32"] = float(agree.mean())
            row["max_dlogit_vs_f32"] = max(float(np.abs(a - b).max()) for a, b in zip(got["logits"], f32["logits"]))
            ok &= row["top1_vs_f32"] >= MIN_TOP1_Q8
    same = [g == r for g, r in zip(got["chats"], ref["chats"])]
    row["chats_same"] = f"{sum(same)}/{len(same)}"
    row["chats"] = [{"llama.cpp": g, "transformers": r} for g, r in zip(got["chats"], ref["chats"])]
    if dtype in RTOL:
        ok &= all(same) and all(r["stopped"] for r in ref["chats"])
    return row, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-python", required=True, help="python of the venv with llama-cpp-python")
    parser.add_argument("--export", default="models/export", type=Path)
    args = parser.parse_args()
    if not (args.export / "config.json").is_file():
        sys.exit(f"gguf-check: {args.export} holds no exported model; run the pipeline (make run) first")
    texts = TEXTS + [llama_cpp.converter_table()["probe_text"]]
    ref = transformers_side(args.export, texts)
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        scratch = Path(tmp)
        files = {f"written {d}": (scratch / f"model.{d}.gguf", d) for d in DTYPES}
        for path, dtype in files.values():
            write_gguf(args.export, path, dtype, "gguf-check")
        for path in sorted(args.export.glob("*.gguf")):
            files[f"{args.export.name}/{path.name}"] = (path, path.stem.split(".")[-1])
        f32 = None
        for name, (path, dtype) in files.items():
            got = llama_side(args.llama_python, path, texts, scratch)
            row, ok = compare(name, dtype, ref, got, f32)
            if name == "written f32" and "error" not in got:
                f32 = got
            rows.append({**row, "pass": ok})
            failed |= not ok
    report(rows)
    sys.exit(1 if failed else 0)


def report(rows: list[dict]) -> None:
    print(f"{'file':<34} {'pre':<9} {'ids':<6} {'max|dlogit|':>11} {'tolerance':>9} {'top1 vs f32':>11} "
          f"{'max|d| vs f32':>13} {'chats same':>10}  result")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['file']:<34} load failed: {r['error']}  FAIL")
            continue
        print(f"{r['file']:<34} {r['pre'] or '-':<9} {r['ids']:<6} {_fig(r, 'max_dlogit', '.3g'):>11} "
              f"{_fig(r, 'tolerance', '.3g'):>9} {_fig(r, 'top1_vs_f32', '.3f'):>11} "
              f"{_fig(r, 'max_dlogit_vs_f32', '.3g'):>13} {r['chats_same']:>10}  "
              f"{'PASS' if r['pass'] else 'FAIL'}")  # fmt: skip
    print("\ngreedy chat replies (llama.cpp | transformers, [stopped on a stop token]):")
    for r in rows[:1] + [r for r in rows[1:] if r.get("chats_same", "") != rows[0].get("chats_same")]:
        for c in r.get("chats", []):
            g, t = c["llama.cpp"], c["transformers"]
            print(f"  {r['file']:<22} {g['text']!r} [{g['stopped']}] | {t['text']!r} [{t['stopped']}]")


def _fig(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


if __name__ == "__main__":
    main()

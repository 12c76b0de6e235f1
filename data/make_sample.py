#!/usr/bin/env python3
"""Generate the deterministic sample data set in data/sample/.

    python data/make_sample.py [--out data/sample] [--seed 0]

Writes two JSON Lines files (UTF-8, LF, one `json.dumps(..., ensure_ascii=False, sort_keys=True)`
record per line), byte-identical for the same seed:

  alpaca.jsonl  2000 records {"instruction", "input", "output"} ("input" is "" for some phrasings)
  chat.jsonl    1000 records {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]},
                some with a system message, some with 2-3 exchanges, always ending with "gpt"

Every task is tiny and very regular (small-number arithmetic, word reversal, uppercasing, ...),
so a ~5M-parameter model can learn it in minutes on a CPU, and every answer is short and exact:
an evaluation simply compares the generated response with `output` (or the last gpt value)
by exact string match. The task name is never written out. Records are distinct within each
file (alpaca: by instruction and input; chat: by whole conversation), so deduplication drops none.

Standard library only; all randomness comes from one `random.Random(seed)`, used in a fixed
order (no set iteration, no clock), so the output depends on the seed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

N_ALPACA = 2000
N_CHAT = 1000

# A fixed, ordered vocabulary of short lowercase words (a tuple: iteration order is fixed).
WORDS = (
    "apple",
    "bird",
    "blue",
    "book",
    "cat",
    "cloud",
    "cold",
    "cup",
    "dog",
    "door",
    "fish",
    "green",
    "hat",
    "house",
    "jump",
    "lamp",
    "leaf",
    "milk",
    "moon",
    "red",
    "ring",
    "road",
    "run",
    "sand",
    "ship",
    "sing",
    "snow",
    "star",
    "stone",
    "sun",
    "table",
    "tree",
    "warm",
    "water",
    "wind",
    "yellow",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer with the result only.",
    "Answer briefly.",
    "You are a careful assistant that gives short, exact answers.",
)

# A generator returns (instruction, input, output); each picks one of a few fixed phrasings.
Example = tuple[str, str, str]


def _pick(rng: random.Random, phrasings: tuple[tuple[str, str], ...], **values: object) -> tuple[str, str]:
    instruction, inp = rng.choice(phrasings)
    return instruction.format(**values), inp.format(**values)


def task_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    phrasings = (
        ("What is {a} + {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Add the two numbers.", "{a} and {b}"),
        ("Compute the sum.", "{a} + {b}"),
    )
    return (*_pick(rng, phrasings, a=a, b=b), str(a + b))


def task_subtract(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)  # keep answers non-negative
    phrasings = (
        ("What is {a} - {b}?", ""),
        ("Subtract {b} from {a}.", ""),
        ("Compute the difference.", "{a} - {b}"),
    )
    return (*_pick(rng, phrasings, a=a, b=b), str(a - b))


def task_reverse_words(rng: random.Random) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    phrasings = (
        ("Reverse the order of these words.", "{w}"),
        ("Write the words in reverse order.", "{w}"),
        ("Reverse this list of words: {w}", ""),
    )
    return (*_pick(rng, phrasings, w=" ".join(words)), " ".join(reversed(words)))


def task_uppercase(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    phrasings = (
        ("Convert the word to uppercase.", "{w}"),
        ("Write {w} in capital letters.", ""),
        ("Uppercase this word: {w}", ""),
    )
    return (*_pick(rng, phrasings, w=word), word.upper())


def task_sort_numbers(rng: random.Random) -> Example:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    phrasings = (
        ("Sort these numbers from smallest to largest.", "{n}"),
        ("Put the numbers in ascending order.", "{n}"),
        ("Sort in ascending order: {n}", ""),
    )
    shown = " ".join(str(x) for x in nums)
    return (*_pick(rng, phrasings, n=shown), " ".join(str(x) for x in sorted(nums)))


def task_repeat_word(rng: random.Random) -> Example:
    word, n = rng.choice(WORDS), rng.randint(2, 5)
    phrasings = (
        ("Repeat the word {w} {n} times.", ""),
        ("Write {w} {n} times.", ""),
        ("Repeat the word {n} times.", "{w}"),
    )
    return (*_pick(rng, phrasings, w=word, n=n), " ".join([word] * n))


def task_next_letter(rng: random.Random) -> Example:
    i = rng.randrange(25)  # a..y, so there always is a next letter
    letter = string.ascii_lowercase[i]
    phrasings = (
        ("What letter comes after {c}?", ""),
        ("What is the next letter of the alphabet after {c}?", ""),
        ("Give the letter that follows this one in the alphabet.", "{c}"),
    )
    return (*_pick(rng, phrasings, c=letter), string.ascii_lowercase[i + 1])


def task_larger(rng: random.Random) -> Example:
    a = rng.randint(0, 99)
    b = rng.randint(0, 98)
    b = b + 1 if b >= a else b  # distinct, so the answer is unambiguous
    phrasings = (
        ("Which is larger, {a} or {b}?", ""),
        ("Give the larger number.", "{a} and {b}"),
        ("What is the maximum of {a} and {b}?", ""),
    )
    return (*_pick(rng, phrasings, a=a, b=b), str(max(a, b)))


def task_count_words(rng: random.Random) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    sentence = " ".join(words)
    sentence = sentence[0].upper() + sentence[1:] + "."
    phrasings = (
        ("How many words are in this sentence?", "{s}"),
        ("Count the words.", "{s}"),
        ("Count the words in this sentence: {s}", ""),
    )
    return (*_pick(rng, phrasings, s=sentence), str(len(words)))


# Ordered: the task drawn for each record is rng.choice over this tuple.
TASKS: tuple[Callable[[random.Random], Example], ...] = (
    task_add,
    task_subtract,
    task_reverse_words,
    task_uppercase,
    task_sort_numbers,
    task_repeat_word,
    task_next_letter,
    task_larger,
    task_count_words,
)


def make_example(rng: random.Random) -> Example:
    return rng.choice(TASKS)(rng)


def make_alpaca(rng: random.Random, n: int = N_ALPACA) -> list[dict]:
    """`n` records with distinct (instruction, input): a repeat is dropped and drawn again, so the
    pipeline's dedup keeps all of them. Tasks with few possible prompts (next letter: 75) end up
    rarer than the rest."""
    out: list[dict] = []
    seen: set[tuple[str, str]] = set()  # membership only, never iterated
    while len(out) < n:
        instruction, inp, output = make_example(rng)
        if (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        out.append({"instruction": instruction, "input": inp, "output": output})
    return out


def make_chat(rng: random.Random, n: int = N_CHAT) -> list[dict]:
    """`n` distinct conversations (a repeat is drawn again)."""
    out: list[dict] = []
    seen: set[str] = set()  # membership only, never iterated
    while len(out) < n:
        turns: list[dict] = []
        if rng.random() < 0.3:
            turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        exchanges = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        for _ in range(exchanges):
            instruction, inp, output = make_example(rng)
            question = f"{instruction}\n{inp}" if inp else instruction
            turns.append({"from": "human", "value": question})
            turns.append({"from": "gpt", "value": output})
        key = json.dumps(turns, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"conversations": turns})
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write records atomically: a temp file beside `path`, then os.replace over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def generate(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write alpaca.jsonl and chat.jsonl into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    alpaca = make_alpaca(rng)  # fixed order: alpaca first, then chat, from one stream
    chat = make_chat(rng)
    paths = {"alpaca": out_dir / "alpaca.jsonl", "chat": out_dir / "chat.jsonl"}
    write_jsonl(paths["alpaca"], alpaca)
    write_jsonl(paths["chat"], chat)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "sample"),
        help="output folder (default: data/sample next to this script)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    for name, path in generate(args.out, args.seed).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluate: every figure recomputed independently (HF's own loss and greedy `generate`) on a tiny case."""

from __future__ import annotations

import json
import math
import os
import runpy
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from reprotune.config.sections import EvaluateConfig
from reprotune.evaluate import batch_scores, compare
from reprotune.generate import answers, greedy_batch
from reprotune.model.builtin import build_tiny_llama
from reprotune.packed import read_val_sequences

from test_merge import write_packed

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 8
PROMPTS = [
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\n",
    "### Instruction:\nName a color.\n\n### Response:\n",
    "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two different tiny models standing in for base and tuned (evaluate only compares folders)."""
    base, tuned = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("tuned")
    build_tiny_llama(base, seed=0)
    build_tiny_llama(tuned, seed=1)
    return base, tuned


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tuned = models
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return AutoTokenizer.from_pretrained(tuned), {"base": load(base), "as_shipped": load(tuned)}


def folders(base: Path, tuned: Path) -> dict:
    """compare's loaders for two model folders, as the stage loads base and merged."""
    from reprotune.loading import load_model

    return {
        "base": lambda: load_model(base, torch.float32, False),
        "as_shipped": lambda: load_model(tuned, torch.float32, False),
    }


def config(**kw) -> EvaluateConfig:
    defaults = {"max_sequences": 10, "max_new_tokens": MAX_NEW, "num_samples": 1, "prompts": (), "batch_size": "auto",
                "general_prompts": None, "general_max_new_tokens": MAX_NEW}  # fmt: skip
    return EvaluateConfig(**(defaults | kw))


def hf_greedy(model, prompt: list[int], stops: list[int]) -> list[int]:
    """Transformers' own greedy generation, without the stop token that ended it."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=stops,
        pad_token_id=2,
    )
    new = out[0, len(prompt) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


@pytest.fixture(scope="module")
def case(hf, tmp_path_factory):
    """Val data: seq 0's answer is the base's own greedy output (a sure match), seq 1's answer is
    wrong for both models, seq 2 is supervised from its first token (scored, not generated)."""
    tok, m = hf
    stops = [1, 4]
    p0, p1, p2 = (tok(p)["input_ids"] for p in PROMPTS)
    answer0 = hf_greedy(m["base"], p0, stops)
    assert answer0  # a non-empty answer, so the match is not trivial
    answer1 = tok(" purple")["input_ids"]
    assert answer1 != hf_greedy(m["base"], p1, stops)[: len(answer1)]
    seq = lambda p, a, end: (p + a + [end], [-100] * len(p) + a + [end])  # noqa: E731
    s0, s1 = seq(p0, answer0, 1), seq(p1, answer1, 4)
    s2 = (tok("plain text to continue")["input_ids"],) * 2
    root = write_packed(tmp_path_factory.mktemp("data") / "packed", [[s0, s1], [s2]])
    return root, [s0, s1, s2]


def split(seq: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """Prompt (before the first label) and answer (the labelled tokens without the final stop token)."""
    ids, labels = seq
    first = next(i for i, x in enumerate(labels) if x != -100)
    return ids[:first], ids[first:-1]


def test_sequences_are_unpacked_in_order_and_limited(case):
    root, seqs = case
    got = read_val_sequences(root, 10)
    assert [(s.input_ids, s.labels) for s in got] == [tuple(map(list, s)) for s in seqs]
    assert len(read_val_sequences(root, 2)) == 2
    assert read_val_sequences(root.parent / "nowhere", 5) == []


def test_sequences_are_spread_over_the_split(tmp_path):
    """Packing sorts by length: taking the first N would evaluate only the longest sequences."""
    rows = [[([k, k + 1], [-100, k + 1]) for k in range(r * 4, r * 4 + 4)] for r in range(3)]  # 12 sequences
    root = write_packed(tmp_path / "packed", rows)
    assert [s.input_ids[0] for s in read_val_sequences(root, 4)] == [0, 3, 6, 9]


def test_figures_match_independent_computation(models, hf, case):
    base, tuned = models
    root, seqs = case
    tok, m = hf
    metrics, samples = compare(folders(base, tuned), tuned, root, config())
    for name, model in m.items():
        nll, n = 0.0, 0
        for ids, labels in seqs:  # HF's loss: mean over the shifted supervised tokens of one sequence
            k = sum(label != -100 for label in labels[1:])
            with torch.no_grad():
                nll += float(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss) * k
            n += k
        got = metrics[name]
        assert got["supervised_tokens"] == n and got["sequences"] == 3
        assert got["loss"] == pytest.approx(nll / n, abs=2e-6)
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        matches = [
            decode(hf_greedy(model, prompt, [1, 4])) == decode(answer) for prompt, answer in map(split, seqs[:2])
        ]
        assert got["generated"] == 2 and got["exact_match_count"] == sum(matches)
        assert got["exact_match"] == sum(matches) / 2
    assert metrics["base"]["exact_match"] == 0.5  # seq 0 by construction, seq 1 by construction not
    assert metrics["delta_loss"] == pytest.approx(metrics["as_shipped"]["loss"] - metrics["base"]["loss"], abs=2e-6)
    (sample,) = samples
    assert sample["index"] == 0 and sample["prompt"] == PROMPTS[0]
    assert sample["reference"] == sample["base"] == tok.decode(split(seqs[0])[1]).strip()


def test_deterministic(models, case):
    root, _ = case
    cfg = config(max_sequences=2, max_new_tokens=4, num_samples=2, prompts=("Say hi.",))
    first = compare(folders(*models), models[1], root, cfg)
    assert compare(folders(*models), models[1], root, cfg) == first


def test_no_validation_split_gives_empty_figures(models, tmp_path):
    metrics, samples = compare(folders(*models), models[1], tmp_path, config(max_sequences=5, max_new_tokens=4))
    assert metrics["base"]["sequences"] == 0 and metrics["base"]["loss"] is None
    assert metrics["delta_loss"] is None and samples == []


def test_general_prompts_are_answered_through_the_chat_template(models, hf, case):
    tok, m = hf
    metrics, samples = compare(folders(*models), models[1], case[0], config(num_samples=0, prompts=("Say hi.",)))
    (sample,) = samples
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
    assert sample["prompt"] == text and sample["index"] is None and sample["reference"] is None
    ids = tok.encode(text, add_special_tokens=False)
    for name, model in m.items():
        assert sample[name] == tok.decode(hf_greedy(model, ids, [1, 4]), skip_special_tokens=True).strip()


def test_stage_writes_metrics_and_samples(models, case, tmp_path, monkeypatch):
    from test_merge import make_adapter

    base, tuned = models
    make_adapter(base, tmp_path / "adapter")
    for src, dst in (
        (base, "models/base"),
        (tmp_path / "adapter", "models/adapter"),
        (tuned, "models/merged"),
        (case[0], "data/packed"),
        (REPO / "data/sample", "data/sample"),
        (REPO / "data/prompts", "data/prompts"),
        (REPO / "params.yaml", "params.yaml"),
        (REPO / "dvc.yaml", "dvc.yaml"),
    ):
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dst).symlink_to(src)
    monkeypatch.chdir(tmp_path)
    # the stage script as dvc runs it: it reads only the params its dvc.yaml entry declares
    runpy.run_path(str(REPO / "stages/evaluate.py"), run_name="__main__")
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(metrics) >= {"base", "as_trained", "as_shipped", "delta_loss", "shipped_vs_trained"}
    assert json.loads(Path("metrics/runtime/evaluate.json").read_text())["seconds"] > 0  # apart: not locked
    for name in ("base", "as_trained", "as_shipped"):
        assert set(metrics[name]) >= {"loss", "perplexity", "exact_match", "sequences", "supervised_tokens"}
    assert metrics["dtype"] == "float32"
    retention = metrics["retention"]  # params.yaml's evaluate.general_prompts: the shipped 240
    assert retention["prompts"] == 240 and set(retention) >= {"base", "as_trained", "as_shipped", "delta_nll"}
    records = json.loads(Path("metrics/models.json").read_text())  # dvc.yaml's plot: a record per model
    assert [r["model"] for r in records] == ["base", "as_trained", "as_shipped"]
    assert records[2] == {"model": "as_shipped", "loss": metrics["as_shipped"]["loss"],
                          "exact_match": metrics["as_shipped"]["exact_match"],
                          "retention_nll": retention["as_shipped"]["nll"],
                          "begins_as_base": retention["as_shipped"]["begins_as_base"]}  # fmt: skip
    lines = Path("metrics/samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2  # two sequences have a prompt (num_samples is 8), then params.yaml's 2 prompts
    assert set(json.loads(lines[1])) == {"index", "prompt", "reference", "base", "as_trained", "as_shipped"}
    assert json.loads(lines[3])["index"] is None


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_answers_are_those_of_one_prompt_at_a_time(hf, batch_size):
    """Left padding, the mask, position ids and the shared KV cache change no answer: 16 prompts of 5 to 60
    tokens answered in batches equal HF's `generate` on each prompt alone, stops and lengths included."""
    tok, m = hf
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 4096, (int(n),), generator=generator).tolist() for n in torch.linspace(5, 60, 16)]
    prompts = prompts[::2] + prompts[1::2]  # lengths out of order: batches are sorted, answers come back in order
    for model in m.values():
        # a stop token that ends some answers early (per-sequence stops) and not others: the third token of one
        stop = hf_greedy(model, prompts[0], [1])[2]
        alone = [hf_greedy(model, p, [stop]) for p in prompts]
        assert len({len(a) for a in alone}) > 1
        assert answers(model, prompts, MAX_NEW, {stop}, batch_size) == alone


def test_a_batch_stops_when_every_answer_has_stopped(hf):
    tok, m = hf
    model = m["base"]
    prompt = tok("Say hi.")["input_ids"]
    first = greedy_batch(model, [prompt], 1, set())[0][0]
    assert greedy_batch(model, [prompt, prompt], MAX_NEW, {first}) == [[], []]


def hf_greedy_with_stop(model, prompt: list[int], stops: list[int], max_new: int) -> list[int]:
    """Transformers' own greedy generation, with the stop token that ended it (if one did)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=stops, pad_token_id=2)  # fmt: skip
    new = out[0, len(prompt) :].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in stops), len(new))]


def test_retention_equals_a_direct_computation(models, hf, case):
    """The base's greedy answers (HF generate, stop token kept) are the reference; each model's mean NLL on
    them is HF's loss, token-weighted; an answer begins as the base's when the model's own greedy answer
    starts with the reference's first 8 tokens (all of them when shorter)."""
    tok, m = hf
    questions = ["Say hi.", "Name a color.", "Add 2 and 3.", "What is the capital of France?", "Count to three."]
    cfg = config(num_samples=0, general_max_new_tokens=12)
    metrics, _ = compare(folders(*models), models[1], case[0], cfg, general=questions)
    retention = metrics["retention"]
    stops = [1, 4]  # the tiny tokenizer's EOS and <|im_end|>
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in questions]  # fmt: skip
    reference = [hf_greedy_with_stop(m["base"], p, stops, 12) for p in prompts]
    assert retention["prompts"] == 5 and retention["reference_tokens"] == sum(map(len, reference))
    assert retention["prefix_tokens"] == 8
    begins = {}
    for name, model in m.items():
        nll = 0.0
        for p, r in zip(prompts, reference):
            with torch.no_grad():
                nll += float(model(torch.tensor([p + r]), labels=torch.tensor([[-100] * len(p) + r])).loss) * len(r)
        own = [hf_greedy_with_stop(model, p, stops, 8) for p in prompts]
        begins[name] = sum(o[: min(8, len(r))] == r[:8] for o, r in zip(own, reference))
        got = retention[name]
        assert got["nll"] == pytest.approx(nll / sum(map(len, reference)), abs=2e-6)
        assert got["begins_as_base_count"] == begins[name] and got["begins_as_base"] == begins[name] / 5
    assert begins["base"] == 5 and begins["as_shipped"] < 5  # the other model answers otherwise: not trivial
    assert retention["delta_nll"] == pytest.approx(retention["as_shipped"]["nll"] - retention["base"]["nll"], abs=2e-6)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no logits_to_keep (as some remote-code models): every position's logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache)  # fmt: skip


def test_a_model_without_logits_to_keep_gets_the_same_figures_and_answers(hf, case):
    tok, m = hf
    model, plain = m["base"], WithoutLogitsToKeep(m["base"])
    seqs = read_val_sequences(case[0], 10)
    got, want = batch_scores(plain, seqs), batch_scores(model, seqs)
    assert got.nll == pytest.approx(want.nll, rel=1e-6) and (got.tokens, got.prefix_matches) == (
        want.tokens,
        want.prefix_matches,
    )
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert answers(plain, prompts, MAX_NEW, {1, 4}, 2) == answers(model, prompts, MAX_NEW, {1, 4}, 2)

"""The loss at supervised positions only (reprotune.train.loss) against the full-logits path of the Trainer:
the same loss and LoRA gradients within 1e-5 relative, with packed rows, gradient accumulation, padded
batches, a tied head, several chunks; peak memory of one step lower."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REPO

from reprotune import testing as synthetic
from reprotune.config import load_params
from reprotune.hardware import resolve
from reprotune.packed import IGNORE_INDEX, PackedRows
from reprotune.train import attention
from reprotune.train import loss as loss_module
from reprotune.train.batches import PaddedCollator, collate_padding_free
from reprotune.train.loss import SupervisedLoss, supervised_positions, unsupported_by
from reprotune.train.model import load_trainable
from reprotune.train.trainer import GuardedTrainer

PARAMS = load_params(REPO / "params.yaml")
CPU = resolve("auto", False, "auto")
RTOL = 1e-5


def trainable(base, packed: bool = True, modules_to_save=PARAMS.lora.modules_to_save, **quant):
    q = dataclasses.replace(PARAMS.quant, **quant)
    # dropout draws from the RNG: the two paths see the same masks only at 0
    lora = dataclasses.replace(PARAMS.lora, dropout=0.0, modules_to_save=modules_to_save)
    return load_trainable(base, q, lora, PARAMS.train, CPU, attention.effective(CPU.attn_implementation, packed))


def micro_batches(tmp_path, packed: bool, n: int = 2) -> list[dict]:
    """`n` micro-batches of two rows each (packed: several sequences a row), prompt tokens unlabelled."""
    seqs = synthetic.sequences(24, seed=3, vocab=4096, max_len=96, mean_len=40)
    synthetic.write_packed_dir(tmp_path / "packed", {"train": seqs}, 128, packed)
    rows = PackedRows(tmp_path / "packed", "train")
    collate = collate_padding_free if packed else PaddedCollator(0)
    return [collate([rows[2 * i], rows[2 * i + 1]]) for i in range(n)]


def trainer(model, supervised: bool):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", label_names=["labels"])
    return GuardedTrainer(model=model, args=args, supervised_loss=SupervisedLoss(model) if supervised else None)


def loss_and_grads(model, batches: list[dict], supervised: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's worth: every micro-batch's loss normalised by the whole step's supervised tokens
    (the Trainer's num_items_in_batch), backward through each, as training_step does."""
    t = trainer(model, supervised)
    model.zero_grad()
    items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        loss = t.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(items))
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, grads


def assert_close(a: tuple, b: tuple) -> None:
    """Loss within RTOL relative; each gradient within RTOL of its largest element (pytest -s prints both)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and grads_a
    worst = max(
        (grads_a[name] - grads_b[name]).abs().max().item() / max(grads_b[name].abs().max().item(), 1e-12)
        for name in grads_a
    )
    print(f"loss {loss_a:.8f} vs {loss_b:.8f} (rel {abs(loss_a - loss_b) / loss_b:.1e}); gradients rel {worst:.1e}")
    assert loss_a == pytest.approx(loss_b, rel=RTOL) and worst <= RTOL


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_loss_and_lora_gradients_equal_the_full_logits_path(tiny_model_dir, packed, monkeypatch, tmp_path):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4096 * 16)  # 16 rows a chunk: many chunks per batch
    model = trainable(tiny_model_dir, packed, load_in_4bit=False)
    batches = micro_batches(tmp_path, packed)
    full = loss_and_grads(model, batches, supervised=False)
    chunked = loss_and_grads(model, batches, supervised=True)
    assert_close(chunked, full)
    # the head's own gradient (modules_to_save: lm_head) flows through the chunks too
    assert any("lm_head" in name for name in chunked[1])


def test_a_tied_head_and_a_4bit_base_are_equal_too(tied_model_dir, tmp_path):
    model = trainable(tied_model_dir, modules_to_save=None, load_in_4bit=True)  # a tied head trains with it
    batches = micro_batches(tmp_path, True)
    assert_close(loss_and_grads(model, batches, True), loss_and_grads(model, batches, False))


def test_evaluation_loss_is_the_batch_mean_as_on_the_full_path(tiny_model_dir, tmp_path):
    model = trainable(tiny_model_dir, load_in_4bit=False).eval()
    [batch] = micro_batches(tmp_path, True, n=1)
    with torch.no_grad():
        full = trainer(model, False).compute_loss(model, dict(batch))
        chunked = trainer(model, True).compute_loss(model, dict(batch))
    assert chunked.item() == pytest.approx(full.item(), rel=RTOL)


def test_the_head_is_restored_and_only_supervised_rows_are_projected(tiny_model_dir, tmp_path):
    model = trainable(tiny_model_dir, load_in_4bit=False)
    [batch] = micro_batches(tmp_path, True, n=1)
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    trainer(model, True).compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(1))
    handle.remove()
    supervised = int(supervised_positions(batch["labels"]).sum())
    assert seen == [(supervised, 256)]  # the model's own call: identity over the kept rows, (n, hidden)
    assert "forward" not in vars(head)  # the class's forward again
    assert 0 < supervised < batch["labels"].numel()  # prompt positions are never projected


def test_models_that_rescale_their_logits_keep_the_full_path(tiny_model_dir):
    model = trainable(tiny_model_dir, load_in_4bit=False)
    assert unsupported_by(model) is None
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_by(model)


def saved_for_backward(model, batch: dict, supervised: bool) -> int:
    """Bytes autograd keeps from the forward of one micro-batch until its backward: the step's activations."""
    sizes: dict[int, int] = {}

    def keep(tensor):
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = trainer(model, supervised).compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(1))
    loss.backward()
    return sum(sizes.values())


def test_one_step_keeps_less_memory_for_backward_than_the_full_logits(tiny_model_dir, tmp_path):
    """The full path keeps the row's (tokens, vocabulary) logits, and their fp32 copy, for backward; this
    one only the supervised rows' hidden states."""
    model = trainable(tiny_model_dir, load_in_4bit=False)
    [batch] = micro_batches(tmp_path, True, n=1)
    full, chunked = (saved_for_backward(model, batch, supervised) for supervised in (False, True))
    logits = batch["input_ids"].numel() * 4096 * 4  # one fp32 (tokens, vocabulary) tensor
    print(f"saved for backward: full {full / 2**20:.1f} MiB, supervised {chunked / 2**20:.1f} MiB")
    assert chunked <= full - logits

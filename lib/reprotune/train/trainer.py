"""The HF Trainer with four additions, each consistent across DDP and FSDP processes.

- Non-finite loss guard: after each micro-batch's backward the loss is checked, and the flag is
  summed over processes, so every rank raises TrainingStopped at the same micro-batch (a rank that
  raised alone would leave the others blocked in the next all-reduce). It runs before the
  optimizer step, so NaN gradients never reach the weights. The check costs one host sync per
  micro-batch, as the Trainer's NaN log filter (turned off in run.py) would.
- Supervised-token count: labels != -100 in every micro-batch of an optimizer step (shifted, as
  the loss sees them), summed over processes, kept in the SupervisedTokens callback.
- Loss at supervised positions only (loss.SupervisedLoss, when given): the model returns the final hidden
  states of the positions whose next token is trained, and the loss projects them through the head in
  chunks; the Trainer's own normalisation (num_items_in_batch, accumulation, processes) is kept.
- Whole checkpoints of a base sharded while loading (FSDP on CPU, sharding.py): the adapter's optimizer,
  scheduler and RNG states, which transformers leaves out for such a model, so a killed run resumes.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from reprotune.packed import IGNORE_INDEX
from reprotune.train.callbacks import SupervisedTokens
from reprotune.train.errors import TrainingStopped
from reprotune.train.loss import SupervisedLoss, supervised_positions


class GuardedTrainer(Trainer):
    def __init__(self, *args, supervised_loss: SupervisedLoss | None = None, **kwargs):
        super().__init__(*args, compute_loss_func=supervised_loss, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not isinstance(self.compute_loss_func, SupervisedLoss):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # (B, T) bool: transformers slices the final hidden states to these rows, (n, hidden)
        inputs = {**inputs, "logits_to_keep": supervised_positions(inputs["labels"])}
        with self.compute_loss_func.hidden_states_out():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
        self.supervised_tokens().seen += int(self._sum_over_processes(local))
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.item()
        if self._sum_over_processes(0.0 if math.isfinite(value) else 1.0) > 0:
            raise TrainingStopped(
                f"non-finite loss (this process: {value}) at optimizer step {self.state.global_step + 1}; "
                "stopped before the optimizer step, so the weights are untouched. Lower "
                "train.learning_rate, use bf16 rather than fp16, or check the data."
            )
        return loss

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_distributed_loading_by_transformers:
            # transformers checkpoints only the model of a base it sharded while loading (save_only_model: in
            # general its optimizer state would be sharded too). Here only the adapter trains, and it is
            # replicated: its optimizer state is whole and equal on every rank, so it is saved as in a
            # one-process run, and a resumed run continues exactly
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            self._save_optimizer_and_scheduler(folder)
            self._save_scaler(folder)
            self._save_rng_state(folder)

    def supervised_tokens(self) -> SupervisedTokens:
        # looked up each time: restoring callback states on resume replaces the instance
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, SupervisedTokens))

    def _sum_over_processes(self, value: float) -> float:
        if self.args.world_size == 1:
            return value
        return self.accelerator.gather(torch.tensor([value], device=self.args.device)).sum().item()

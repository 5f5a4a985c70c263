"""Lightning's progress bar, with true totals for runs bounded by `trainer.max_steps`.

Lightning's bar shows `Epoch 2/-2` when `max_epochs=-1` (it prints max_epochs - 1), and
takes an epoch's total as min(batches in the epoch, optimizer steps left): steps and
batches differ by `accumulate_grad_batches`, so under accumulation it counts `48/12`.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def steps_per_epoch(trainer: L.Trainer) -> int:
    # Lightning steps at an epoch's last batch even when its accumulation window is short
    return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)


def last_epoch(trainer: L.Trainer) -> int | None:
    """Index of the run's last epoch: whichever of max_epochs and max_steps ends it first;
    None when neither bounds it (or the loader has no length)."""
    bounds = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        bounds.append(trainer.max_epochs - 1)
    batches = trainer.num_training_batches
    if trainer.max_steps > 0 and batches not in (0, float("inf")):
        bounds.append(math.ceil(trainer.max_steps / steps_per_epoch(trainer)) - 1)
    return min(bounds) if bounds else None


def epoch_total(trainer: L.Trainer) -> int | float:
    """Batches of the current epoch the run will train (fewer in a last, step-bound epoch)."""
    batches = trainer.num_training_batches
    if trainer.max_steps <= 0 or batches in (0, float("inf")):
        return batches
    steps_before = trainer.current_epoch * steps_per_epoch(trainer)
    steps_left = trainer.max_steps - steps_before  # this epoch onwards
    return min(batches, steps_left * trainer.accumulate_grad_batches)


class StepBoundProgressBar(RichProgressBar):
    """`Epoch 2/3` and `12/44`, never `Epoch 2/-2` or `48/12`."""

    @property
    def total_train_batches(self) -> int | float:
        return epoch_total(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        last = last_epoch(self.trainer)
        text = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
        return f"{text:{len(self.validation_description)}}"  # as Lightning pads it

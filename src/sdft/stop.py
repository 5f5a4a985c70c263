"""A run's status file and the graceful stop: Ctrl+C, SIGTERM or the web UI's Cancel still
leaves the adapter (both formats) and a checkpoint to resume from.

Lightning already turns a SIGINT (KeyboardInterrupt, at once) and a SIGTERM (after the current
step) into a call of every callback's `on_exception`; `GracefulStop` saves there, from the
weights as they are, and records the run as cancelled in `<run>/status.json`:
`{"status": "running" | "finished" | "cancelled" | "failed", "step": ..., "error": ...}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sdft.files import write_atomic

STATUS_FILE = "status.json"
CANCELLED_CKPT = "checkpoints/last.ckpt"  # the newest state: what resume=true picks


def write_status(out_dir: str | Path, status: str, **info: object) -> Path:
    path = Path(out_dir) / STATUS_FILE
    write_atomic(path, json.dumps({"status": status, "time": time.time(), **info}))
    return path


def read_status(out_dir: str | Path) -> dict:
    """The run's status; {} for a folder without one (a run of an older sdft)."""
    path = Path(out_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class GracefulStop(L.Callback):
    """On an interrupt, save the adapter and a checkpoint; record each state of the run."""

    _boundary: tuple[int, dict | None] = (-1, None)  # (step, sampler state) after the last step

    def __init__(self, out_dir: str | Path, metadata: Callable[[], dict] = dict):
        self.out_dir = Path(out_dir)
        self.metadata = metadata  # a callable: split.json exists only once fit has started

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_status(self.out_dir, "running", step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._mark_step_boundary(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if trainer.global_step != self._boundary[0]:  # an optimizer step ran in this batch
            self._mark_step_boundary(trainer, module)

    def _mark_step_boundary(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sampler = module.train_sampler()
        self._boundary = (trainer.global_step, sampler.state_dict() if sampler else None)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, error: BaseException):
        step = trainer.global_step
        if not isinstance(error, (KeyboardInterrupt, SIGTERMException)):
            if trainer.is_global_zero:
                write_status(
                    self.out_dir, "failed", step=step, error=f"{type(error).__name__}: {error}"
                )
            return
        ckpt = self.out_dir / CANCELLED_CKPT
        step_at_boundary, sampler_state = self._boundary
        if sampler_state is not None and trainer.global_step == step_at_boundary:
            # stopped inside an accumulation window: its micro-batches are trained again
            module.train_sampler().rewind(sampler_state)
        trainer.save_checkpoint(ckpt)  # on every rank: under DDP it synchronises them
        if not trainer.is_global_zero:
            return
        files = module.save_adapter(self.out_dir, self.metadata())
        write_status(
            self.out_dir, "cancelled", step=step, files=[str(f) for f in files], ckpt=str(ckpt)
        )
        print(f"\nsdft: cancelled at step {step}; adapter and checkpoint saved in {self.out_dir}")
        for f in files:
            print(f"  adapter      {f}")
        print(f"  checkpoint   {ckpt} (resume: ckpt_path={ckpt})", flush=True)

"""Checkpoints, written and read by one rule each.

- `load_checkpoint`: the one reader. `weights_only=True`, so a pickle payload in a file a
  user was handed never runs; sdft's own checkpoints hold only tensors and plain values.
- `AtomicCheckpointIO`: the one writer. A temporary file beside the final one, flushed to
  disk, then renamed: a kill or a full disk leaves the old file or the new one, never half a
  file under a checkpoint's name (Lightning's own save goes through the system temp folder,
  and across filesystems that is a copy).
- `StepCheckpoint`: Lightning's ModelCheckpoint that saves only at an optimizer-step boundary
  (never mid accumulation window) and never weights that are not finite.
- `newest_intact`: what `resume=true` picks, skipping (and naming) a damaged file.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)
PARTIAL = ".partial-"  # infix of a checkpoint being written: `.last.ckpt.partial-<pid>`


class CheckpointLoadError(ValueError):
    """A checkpoint that cannot be read, or that sdft refuses to read."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)` onto the CPU.

    Raises CheckpointLoadError naming the file: refused when it needs more than tensors and
    plain Python values to load (unpickling it could run code), unreadable when truncated
    or not a checkpoint at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal of a global it does not allow
        first = str(e).split("\n")[0]
        raise CheckpointLoadError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain values, "
            f"and unpickling them could run code ({first}). sdft's own checkpoints never do."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = f"{path}: not a readable checkpoint (damaged or truncated: {e})"
        raise CheckpointLoadError(msg) from e


def is_partial(path: Path) -> bool:
    return PARTIAL in path.name


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint as temp file + rename in its own folder (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete temporary files a killed save left behind; returns them."""
    orphans = [p for p in folder.glob(f".*{PARTIAL}*") if p.is_file()]
    for p in orphans:
        p.unlink(missing_ok=True)  # under DDP every rank looks
        log.warning("removed %s: a checkpoint write that never finished", p)
    return orphans


def newest_intact(candidates: list[Path]) -> tuple[dict, Path]:
    """The newest (by modification time) of `candidates` that loads, and its contents; a
    damaged one is skipped with a warning naming it."""
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return load_checkpoint(path), path
        except CheckpointLoadError as e:
            log.warning("skipping %s, falling back to an older checkpoint", e)
    raise FileNotFoundError(f"no intact checkpoint among {[str(p) for p in candidates]}")


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves only between optimizer steps, never mid accumulation window
    (such a checkpoint records micro-batches whose gradients it does not hold, so a resume
    from it skips them), and never weights that are not finite. When the run stops on a
    non-finite loss (FloatingPointError), the checkpoints of the weights that gave it, saved
    at the current step, are deleted: a resume from them would stop the same way."""

    _step_at_batch_start = 0
    _at_step_boundary = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._saved: list[tuple[int, str]] = []  # (global step, file) of each save

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, FloatingPointError) or not trainer.is_global_zero:
            return
        for step, path in self._saved:
            if step == trainer.global_step and Path(path).is_file():
                Path(path).unlink()
                log.warning("removed %s: its weights gave a non-finite loss", path)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # an optimizer step ran in this batch iff global_step moved
        self._at_step_boundary = trainer.global_step != self._step_at_batch_start
        super().on_train_batch_end(trainer, *args)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not self._at_step_boundary:
            log.info("not saving %s: mid accumulation window", filepath)
            return
        params = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
        if params and not torch.stack([p.isfinite().all() for p in params]).all():
            log.warning(
                "not saving %s: the weights after step %d are not finite",
                filepath,
                trainer.global_step,
            )
            return
        super()._save_checkpoint(trainer, filepath)
        self._saved.append((trainer.global_step, filepath))

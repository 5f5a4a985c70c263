"""Training speed as users compare it: samples/s in steady state and peak GPU memory."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import psutil
import torch

log = logging.getLogger(__name__)


class SpeedMonitor(L.Callback):
    """Times optimiser steps after `warmup_steps` (compilation, allocator growth, cuDNN
    autotuning stay out of the numbers); logs `perf/samples_per_s` and writes `perf.json`.

    A run that ends with fewer than `min_timed_steps` steps after its warm-up gets no speed
    (a number that would count the warm-up, or too few steps): `perf.json` then says why,
    and a warning says the run ended inside its warm-up (e.g. `trainer.max_time` spent on a
    cold compile)."""

    def __init__(
        self,
        warmup_steps: int = 10,
        out_file: str | None = None,
        print_every_n_steps: int = 0,
        min_timed_steps: int = 10,
    ):
        self.warmup_steps = warmup_steps
        self.out_file = out_file
        self.print_every_n_steps = print_every_n_steps  # >0: a progress line (logs, no bar)
        self.min_timed_steps = min_timed_steps
        self._t0: float | None = None  # the clock starts at the end of the warm-up
        self._t_end = 0.0  # ... and stops at the last training step (not at the end-of-fit
        self._samples = 0  # evaluation, which other callbacks run in on_train_end)
        self._steps, self._timed_from = 0, 0  # timed steps, and the step the clock started
        self._train_t0 = 0.0
        self._first_step_s: float | None = None
        self._launch_s: float | None = None  # process start -> end of the first step
        self._printed = -1

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # peak memory of training itself (model loading and cache building excluded)
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self._train_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._first_step_s is None and step > 0:  # compile included, when compiled
            self._sync(module)
            self._first_step_s = time.perf_counter() - self._train_t0
            self._launch_s = time.time() - psutil.Process().create_time()
        every = self.print_every_n_steps
        if every and step % every == 0 and trainer.is_global_zero and step != self._printed:
            self._printed = step
            rate = self._samples / (time.perf_counter() - self._t0) if self._samples else 0.0
            print(f"sdft step {step}: {rate:.1f} samples/s since warm-up", flush=True)
        if self._t0 is None:
            if step >= self.warmup_steps:
                self._sync(module)
                self._t0, self._samples, self._timed_from = time.perf_counter(), 0, step
            return
        self._samples += len(batch["caption"]) * trainer.world_size
        self._steps = step - self._timed_from
        # no sync: the loss check keeps the CPU at most one micro-batch ahead of the GPU
        self._t_end = time.perf_counter()

    def summary(self, module: L.LightningModule) -> dict:
        out: dict = {
            "steps_done": module.trainer.global_step,  # fewer than max_steps after max_time
            "warmup_steps": self.warmup_steps,
            "first_step_s": self._first_step_s,
            # what a user waits for: imports, model load, cache, compile and the first step
            "launch_to_first_step_s": self._launch_s,
        }
        if self._steps < self.min_timed_steps:
            out["samples_per_s"] = None
            out["reason"] = (
                f"only {self._steps} steps after the {self.warmup_steps} warm-up steps "
                f"(min_timed_steps={self.min_timed_steps}): too few to time steady state"
            )
        else:
            seconds = self._t_end - self._t0
            out["samples_per_s"] = self._samples / seconds
            out["timed_samples"] = self._samples
            out["timed_seconds"] = seconds
        if module.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(module.device) / 1e9
            out["device"] = torch.cuda.get_device_name(module.device)
        return out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        stats = self.summary(module)
        if stats["samples_per_s"] is None:
            log.warning(
                "the run ended inside its warm-up, at step %d (%s); perf.json records no speed. "
                "If trainer.max_time stopped it, a cold torch.compile may have used the "
                "budget (the first step took%s).",
                trainer.global_step,
                stats["reason"],
                f" {self._first_step_s:.0f} s" if self._first_step_s else " the whole run",
            )
        numbers = {f"perf/{k}": v for k, v in stats.items() if isinstance(v, int | float)}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=trainer.global_step)
        print(
            "sdft speed: "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
            )
        )
        if self.out_file:
            Path(self.out_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out_file).write_text(json.dumps(stats, indent=1))

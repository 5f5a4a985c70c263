"""Training speed as users compare it: samples/s in steady state and peak GPU memory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class SpeedMonitor(L.Callback):
    """Times optimiser steps after `warmup_steps` (compilation, allocator growth, cuDNN
    autotuning stay out of the numbers); logs `perf/samples_per_s` and writes `perf.json`."""

    def __init__(self, warmup_steps: int = 10, out_file: str | None = None):
        self.warmup_steps = warmup_steps
        self.out_file = out_file
        self._t0: float | None = None
        self._step0 = 0
        self._samples = 0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._t0 is None:
            if step >= self.warmup_steps:
                self._sync(module)
                self._t0, self._step0, self._samples = time.perf_counter(), step, 0
                if module.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(module.device)
            return
        self._samples += len(batch["caption"]) * trainer.world_size

    def summary(self, module: L.LightningModule) -> dict:
        if self._t0 is None or not self._samples:
            return {}
        self._sync(module)
        seconds = time.perf_counter() - self._t0
        out = {
            "samples_per_s": self._samples / seconds,
            "timed_samples": self._samples,
            "timed_seconds": seconds,
        }
        if module.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(module.device) / 1e9
            out["device"] = torch.cuda.get_device_name(module.device)
        return out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        stats = self.summary(module)
        if not stats or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"perf/{k}": v for k, v in stats.items() if k != "device"},
                step=trainer.global_step,
            )
        print(
            "sdft speed: "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()
            )
        )
        if self.out_file:
            Path(self.out_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out_file).write_text(json.dumps(stats, indent=1))

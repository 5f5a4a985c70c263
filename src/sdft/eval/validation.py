"""Validation loss: says when a run is done, cheaply, while it trains.

The loss on held-out images at fixed timesteps with fixed noise, so the same weights always
give the same number and two numbers differ only because the weights did. It is the plain
MSE on the model's target (noise or velocity), whatever `loss` trains with, so runs with
different loss settings compare.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import Dataset

from sdft.module import eval_modes

log = logging.getLogger(__name__)


def metric_name(split: str, t: int | None = None) -> str:
    """`val/loss` for the held-out data, `val/loss_trained` for a held-out slice of the
    trained categories; `_t100` etc. for one timestep."""
    name = "val/loss" if split == "held_out" else f"val/loss_{split}"
    return name if t is None else f"{name}_t{t}"


class ValidationLoss(L.Callback):
    """Every `every_n_steps` optimiser steps and at the end of fit, the loss on the
    datamodule's `val_datasets()` ({"held_out": ..., "trained": ...}) at each of
    `timesteps`, with noise drawn once from `seed`. Logged as `val/loss` (mean over the
    timesteps) and `val/loss_t<t>`, and put in `trainer.callback_metrics` before the
    checkpoint callback runs, so `callbacks.checkpoint.monitor=val/loss` sees this step's."""

    def __init__(
        self,
        every_n_steps: int = 0,
        timesteps: list[int] = (100, 300, 500, 700, 900),
        seed: int = 0,
        batch_size: int = 8,
    ):
        timesteps = list(timesteps)
        if not timesteps or any(not isinstance(t, int) or t < 0 for t in timesteps):
            raise ValueError(f"val.timesteps={timesteps} must be non-negative integers")
        if every_n_steps < 0:
            raise ValueError(f"val.every_n_steps={every_n_steps} must be >= 0 (0: at the end)")
        self.every_n_steps, self.timesteps, self.seed = every_n_steps, timesteps, seed
        self.batch_size = batch_size
        self.sets: dict[str, list] = {}  # split -> [(latents, noise, captions)], filled once
        self._last_step = -1

    def check(self, num_train_timesteps: int) -> None:
        """Raise unless every timestep is one the scheduler has."""
        bad = [t for t in self.timesteps if t >= num_train_timesteps]
        if bad:
            raise ValueError(
                f"val.timesteps {bad} are outside the scheduler's range "
                f"0..{num_train_timesteps - 1}"
            )

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.check(module.noise_scheduler.config.num_train_timesteps)

    # -- when ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if self.due(trainer) and trainer.global_step != self._last_step:
            self.log_to(trainer, self.evaluate(trainer, module))

    def due(self, trainer: L.Trainer) -> bool:
        """Every `every_n_steps`, and whenever a checkpoint that monitors a `val/` metric is
        about to save: it then ranks this step's weights by this step's number."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        return any(
            str(c.monitor).startswith("val/")
            and c._every_n_train_steps  # Lightning keeps it private; no public getter
            and step % c._every_n_train_steps == 0
            for c in trainer.checkpoint_callbacks
        )

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.log_to(trainer, self.evaluate(trainer, module))

    def log_to(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        self._last_step = trainer.global_step
        if not metrics:
            return
        # straight to the loggers: self.log in a batch hook only logs every log_every_n_steps
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- what ---------------------------------------------------------------------------
    def prepare(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Encode each held-out image once (the VAE is frozen) and draw its fixed noise."""
        datasets = getattr(trainer.datamodule, "val_datasets", dict)()
        for split, dataset in datasets.items():
            g = torch.Generator().manual_seed(self.seed)  # on the CPU: the same on any device
            chunks = []
            for idx in self.chunks(dataset):
                latents = self.encode(module, dataset, idx)  # (b, 4, h, w)
                noise = torch.randn(latents.shape, generator=g).to(latents.device)
                captions = [dataset[(i, False)]["caption"] for i in idx]
                chunks.append((latents, noise, captions))
            if chunks:
                self.sets[split] = chunks
        if not self.sets:
            log.warning("validation loss: the data has no held-out images, nothing to score")

    def chunks(self, dataset: Dataset) -> list[list[int]]:
        """Consecutive indices of one image size, at most `batch_size` each."""
        out: list[list[int]] = []
        for i in range(len(dataset)):
            same = out and dataset.image_size(out[-1][0]) == dataset.image_size(i)
            if same and len(out[-1]) < self.batch_size:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    @torch.no_grad()
    def encode(self, module: L.LightningModule, dataset: Dataset, idx: list[int]) -> torch.Tensor:
        pixels = torch.stack([dataset[(i, False)]["pixel_values"] for i in idx])  # (b, 3, H, W)
        with module.inference_context():
            dist = module.vae.encode(pixels.to(module.device, module.vae.dtype)).latent_dist
        return dist.mean.float() * module.vae.config.scaling_factor  # (b, 4, h, w)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """{metric name: loss} of the current weights; the same weights give the same dict."""
        if not self.sets:
            self.prepare(trainer, module)
        metrics = {}
        with eval_modes(module), module.inference_context():
            for split, chunks in self.sets.items():
                per_t = {t: [] for t in self.timesteps}  # per-sample losses
                for latents, noise, captions in chunks:
                    text = module.encode_prompt(captions)  # (b, 77, D): it may be trained
                    for t in self.timesteps:
                        per_t[t].append(module.fixed_timestep_loss(latents, noise, t, text))
                for t, losses in per_t.items():
                    metrics[metric_name(split, t)] = torch.cat(losses).mean().item()
                total = sum(metrics[metric_name(split, t)] for t in self.timesteps)
                metrics[metric_name(split)] = total / len(self.timesteps)
        return metrics

"""Callbacks that look at what the adapter generates while it trains."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from sdft.eval.grids import image_grid
from sdft.module import eval_modes


class PreviewGrid(L.Callback):
    """Every `every_n_steps` optimiser steps and at the end of fit, a grid of fixed prompts
    (rows) x fixed seeds (columns), sampled with DPM++ 2M; saved as PNG and logged."""

    def __init__(
        self,
        prompts: list[str],
        seeds: list[int] = (0, 1, 2, 3),
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        every_n_steps: int = 0,
        out_dir: str = "previews",
        resolution: int | None = None,
    ):
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.negative_prompt = negative_prompt
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.every_n_steps, self.out_dir, self.resolution = every_n_steps, Path(out_dir), resolution
        self._last_step = -1

    @torch.no_grad()
    def render(self, trainer: L.Trainer, module: L.LightningModule) -> Image.Image:
        pipe = module.inference_pipeline()
        pipe.set_progress_bar_config(disable=True)
        images = []
        with eval_modes(module), module.inference_context():
            for prompt in self.prompts:
                gens = [torch.Generator(module.device).manual_seed(s) for s in self.seeds]
                images += pipe(
                    [prompt] * len(self.seeds),
                    negative_prompt=[self.negative_prompt] * len(self.seeds),
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    generator=gens,
                    height=self.resolution,
                    width=self.resolution,
                ).images
        return image_grid(images, rows=len(self.prompts))

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        grid = self.render(trainer, module)
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:06d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("preview", [grid], step=step, caption=[" | ".join(self.prompts)])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # not on_fit_end: by then Lightning has moved the module back to the CPU
        self.save(trainer, module)

"""The paper's LoRA-scale sweep (Guo & Cao, figures 10 and 11), as a Lightning callback.

For each LoRA scale, images of "a scribble of {category}" for trained and held-out
categories from fixed seeds; for each image, its CLIP score with its prompt and its mean
CLIP image cosine with real drawings of its category. Reported per scale: mean and spread
over the images; once: the CLIP score of the real drawings with their own captions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdft.ema import find_ema
from sdft.eval.grids import labelled_grid, to_pil
from sdft.eval.metrics import ClipScorer, ImageEncoder, clip_score, image_cosine
from sdft.eval.results import (
    GROUPS,
    SweepResult,
    append_history,
    log_results,
    scale_key,
    write_results,
)
from sdft.module import eval_modes

log = logging.getLogger(__name__)
DEFAULT_SCALES = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0


@dataclass(frozen=True)
class SweepImage:
    """One image of the sweep: where it sits in the sweep's order, and what makes it."""

    index: int  # position in the sweep: the same on every rank
    scale: float  # LoRA scale
    group: str  # "trained" | "held_out"
    category: str  # prompted as prompt_template.format(category=...)
    seed: int
    in_grid: bool  # shown in its group's scale grid


def ground_truth_drawings(
    datamodule: L.LightningDataModule, group: str, categories: list[str]
) -> dict[str, torch.Tensor]:
    """The split's real drawings of `categories` (of `group`: "trained" or "held_out"),
    rendered as training renders them: category -> uint8 (n, 3, R, R), black on white."""
    dataset = datamodule.reference_dataset(group)
    out: dict[str, list[torch.Tensor]] = {c: [] for c in categories}
    for i, drawing in enumerate(dataset.drawings):
        if drawing.category in out:
            x = dataset[i]["pixel_values"]  # (3, R, R) in [-1, 1]
            out[drawing.category].append(((x + 1) * 127.5).round().to(torch.uint8))
    return {c: torch.stack(v) for c, v in out.items()}


def gather_by_index(
    values: torch.Tensor,
    indices: list[int],
    total: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    world: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Each rank's `values` (k, ...) for its item `indices` -> (total, ...) on every rank,
    in item order. `gather` is the strategy's all_gather (stacks ranks on a new dim 0)."""
    out = values.new_zeros((total, *values.shape[1:]))
    if world == 1 or gather is None:
        out[indices] = values
        return out
    most = int(gather(torch.tensor([len(indices)], device=device)).max())
    padded = values.new_zeros((most, *values.shape[1:]))
    padded[: len(indices)] = values
    idx = torch.full((most,), -1, dtype=torch.long)
    idx[: len(indices)] = torch.tensor(indices, dtype=torch.long)
    all_values = gather(padded.to(device)).reshape(-1, *values.shape[1:]).cpu()
    all_idx = gather(idx.to(device)).reshape(-1).cpu()
    keep = all_idx >= 0
    out[all_idx[keep]] = all_values[keep]
    return out


def shard_and_gather(
    images: list[SweepImage],
    work: Callable[[list[SweepImage]], dict[str, tuple[torch.Tensor, list[int]]]],
    rank: int = 0,
    world: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """`work` on this rank's share of `images` (every `world`-th from `rank`), gathered.

    `work(share)` returns, per name, values (k, ...) and the `index` of the image each row
    belongs to (all of the share, or a part of it, such as the images a grid shows). Every
    rank gets, per name, (len(images), ...) in sweep order; rows no rank filled are zeros."""
    out = work(images[rank::world])
    return {
        name: gather_by_index(values, indices, len(images), gather, world, device)
        for name, (values, indices) in out.items()
    }


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), (x.std().item() if len(x) > 1 else 0.0)


def reference_row(reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """The real drawings' CLIP scores with their own captions, per group: mean and spread."""
    out = {}
    for g, r in reference.items():
        out[f"clip_score_reference{GROUPS[g]}"] = clip_score(r)
        out[f"clip_score_reference{GROUPS[g]}_std"] = _mean_std(r)[1]
    return out


class ScaleSweepEvaluator(L.Callback):
    """CLIP score and CLIP image cosine of generated scribbles at each LoRA scale.

    Runs at the end of fit, and also every `every_n_steps` optimiser steps and/or whenever a
    checkpoint is saved (`on_checkpoint`, the numbers go into the checkpoint too). Under DDP
    each rank generates a share of the images and the per-image numbers are gathered."""

    def __init__(
        self,
        scales: list[float] = DEFAULT_SCALES,
        num_prompts: int = 10,
        seeds: list[int] = (0, 1),
        prompt_template: str = "a scribble of {category}",
        negative_prompt: str = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        batch_size: int = 40,
        clip_batch_size: int = 64,
        clip_score_model: str = "openai/clip-vit-base-patch16",
        image_model: str = "openai/clip-vit-large-patch14",
        grid_rows: int = 5,
        every_n_steps: int = 0,
        on_checkpoint: bool = False,
        out_dir: str = "eval",
        use_ema: bool | str = False,
    ):
        if use_ema not in (False, True, "both"):
            raise ValueError(f"eval.use_ema={use_ema!r} must be false, true or both")
        self.scales = [float(s) for s in scales]
        self.num_prompts, self.seeds = num_prompts, list(seeds)
        self.prompt_template = prompt_template
        self.negative_prompt = negative_prompt
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.resolution, self.batch_size = resolution, batch_size
        self.clip_batch_size = clip_batch_size
        self.models = {"clip_score": clip_score_model, "image_cosine": image_model}
        self.grid_rows = grid_rows
        self.every_n_steps, self.on_checkpoint = every_n_steps, on_checkpoint
        self.out_dir = Path(out_dir)
        self.use_ema = use_ema
        self.scorer: ClipScorer | None = None
        self.encoder: ImageEncoder | None = None
        self.results: dict[tuple, SweepResult] = {}  # by (global step, "eval" or "eval_ema")
        self._references: dict[tuple, tuple] = {}

    # -- models: loaded once, only for a sweep that will run; in `setup`, so that a missing
    # one stops the run before training
    @staticmethod
    def will_run(datamodule: L.LightningDataModule | None) -> bool:
        """Whether the data has categories to prompt (QuickDraw); DreamBooth and caption
        folders have none, and the sweep is skipped without loading any CLIP model."""
        return hasattr(datamodule, "reference_dataset")

    def load_models(self) -> None:
        if self.scorer is None:
            self.scorer = ClipScorer(self.models["clip_score"], self.clip_batch_size)
            self.encoder = ImageEncoder(self.models["image_cosine"], self.clip_batch_size)

    def _models_to(self, device: torch.device | str) -> None:
        self.scorer.to(device)
        self.encoder.to(device)

    # -- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pipe: StableDiffusionPipeline,
        prompts: list[str],
        seeds: list[int],
        scale: float,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """One image per (prompt, seed) pair at LoRA `scale`: uint8 (N, 3, H, W) on the CPU,
        `batch_size` images per pipeline call. Each image depends only on its seed."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            gens = [
                torch.Generator(pipe.device).manual_seed(s) for s in seeds[i : i + self.batch_size]
            ]
            with context():
                images = pipe(
                    chunk,
                    negative_prompt=[self.negative_prompt] * len(chunk),
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    generator=gens,
                    height=self.resolution,
                    width=self.resolution,
                    output_type="pt",
                    # diffusers scales every LoRA layer by this for the call only
                    cross_attention_kwargs={"scale": scale},
                ).images  # (B, 3, H, W) in [0, 1]
            # the rounding diffusers uses for PIL output: saved grids are these pixels
            out.append((images.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu())
        return torch.cat(out)

    def scale_grid(
        self,
        pipe: StableDiffusionPipeline,
        prompts: list[str],
        seeds: list[int],
        scales: list[float],
        title: str = "",
        labels: list[str] | None = None,
    ) -> Image.Image:
        """Rows: each prompt with each seed; columns: LoRA scales (the paper's figures 5-9)."""
        pairs = [(p, s) for p in prompts for s in seeds]
        columns = [
            self.generate(pipe, [p for p, _ in pairs], [s for _, s in pairs], scale)
            for scale in scales
        ]
        images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: pair, then scale
        rows = labels or [f"{p} (seed {s})" if len(seeds) > 1 else p for p, s in pairs]
        return labelled_grid(to_pil(images), rows, [f"scale {scale_key(s)}" for s in scales], title)

    # -- ground truth: encoded once (the drawings do not change while training) --------
    def references(
        self, datamodule: L.LightningDataModule, categories: dict[str, list[str]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The image embeddings (n, D) of each category's real drawings, and per group the
        CLIP scores of those drawings with their captions."""
        key = tuple((g, tuple(c)) for g, c in categories.items())
        if key not in self._references:
            drawings = {}
            for group, cats in categories.items():
                drawings |= ground_truth_drawings(datamodule, group, cats)
            feats = {c: self.encoder.encode(drawings[c]) for c in drawings}
            scores = {}
            for group, cats in categories.items():
                images = torch.cat([drawings[c] for c in cats])
                captions = [self.prompt(c) for c in cats for _ in range(len(drawings[c]))]
                scores[group] = self.scorer.scores(images, captions)
            self._references[key] = (feats, scores)
        return self._references[key]

    def prompt(self, category: str) -> str:
        return self.prompt_template.format(category=category)

    # -- the sweep -------------------------------------------------------------------
    def plan(self, categories: dict[str, list[str]]) -> list[SweepImage]:
        """Every image of the sweep, in the order every rank agrees on: scale, group,
        category, seed. The grids show the first seed of the first `grid_rows` categories."""
        order = [
            (s, g, c, seed)
            for s in self.scales
            for g, cats in categories.items()
            for c in cats
            for seed in self.seeds
        ]
        return [
            SweepImage(
                i, s, g, c, seed, seed == self.seeds[0] and c in categories[g][: self.grid_rows]
            )
            for i, (s, g, c, seed) in enumerate(order)
        ]

    def evaluate(
        self,
        pipe: StableDiffusionPipeline,
        datamodule: L.LightningDataModule,
        rank: int = 0,
        world: int = 1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> SweepResult:
        """Generate this rank's share of scales x categories x seeds of the data module's
        split, score every image, gather; every rank returns the same result."""
        t0 = time.perf_counter()
        self.load_models()
        self._models_to(pipe.device)
        split = datamodule.split
        cats = {g: list(split[g][: self.num_prompts]) for g in GROUPS if split[g]}
        images = self.plan(cats)
        side = self.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        try:
            gt_feats, reference = self.references(datamodule, cats)

            def work(share: list[SweepImage]) -> dict[str, tuple[torch.Tensor, list[int]]]:
                numbers, shown = self._generate_and_score(pipe, share, gt_feats, context)
                if shown:
                    grid = torch.stack(list(shown.values()))
                else:  # this rank drew no grid image; it still joins the gather
                    grid = torch.zeros((0, 3, side, side), dtype=torch.uint8)
                return {
                    "numbers": (numbers, [im.index for im in share]),
                    "grid": (grid, list(shown)),
                }

            out = shard_and_gather(images, work, rank, world, gather, pipe.device)
        finally:
            self._models_to("cpu")  # give the accelerator back to training
        scores, cosines = out["numbers"].unbind(1)
        return SweepResult(
            rows=[self._row(s, images, scores, cosines) for s in self.scales],
            reference=reference_row(reference),
            grids=self._grids(images, out["grid"], cats),
            models=dict(self.models),
            categories=cats,
            images=len(images),
            seconds=time.perf_counter() - t0,
        )

    def _generate_and_score(
        self,
        pipe: StableDiffusionPipeline,
        share: list[SweepImage],
        gt_feats: dict[str, torch.Tensor],
        context: Callable[[], contextlib.AbstractContextManager],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Generate `share`, one scale at a time, and score each image: its (CLIP score, image
        cosine to the real drawings of its category) as (k, 2); and by `index`, the pixels
        (3, H, W) of the images a grid shows (only those: 440 images at 512 px are 350 MB)."""
        numbers = torch.zeros(len(share), 2)
        shown: dict[int, torch.Tensor] = {}
        for s in self.scales:
            pos = [k for k, im in enumerate(share) if im.scale == s]
            if not pos:
                continue
            prompts = [self.prompt(share[k].category) for k in pos]
            images = self.generate(pipe, prompts, [share[k].seed for k in pos], s, context)
            numbers[pos, 0] = self.scorer.scores(images, prompts)
            feats = self.encoder.encode(images)  # (n, D)
            for j, k in enumerate(pos):
                numbers[k, 1] = image_cosine(feats[j : j + 1], gt_feats[share[k].category])[0]
                if share[k].in_grid:
                    shown[share[k].index] = images[j]
        return numbers, shown

    def _row(self, scale: float, images: list[SweepImage], scores, cosines) -> dict[str, float]:
        """One scale's line of the table: mean and spread of each number, per group."""
        row = {"scale": scale}
        for g, suffix in GROUPS.items():
            sel = [im.index for im in images if im.scale == scale and im.group == g]
            if not sel:
                continue
            row[f"clip_score{suffix}"] = clip_score(scores[sel])
            row[f"clip_score{suffix}_std"] = _mean_std(scores[sel])[1]
            row[f"clip_img_cos{suffix}"], row[f"clip_img_cos{suffix}_std"] = _mean_std(cosines[sel])
            row[f"n_images{suffix}"] = len(sel)
        return row

    def _grids(
        self, images: list[SweepImage], pixels: torch.Tensor, cats: dict[str, list[str]]
    ) -> dict[str, Image.Image]:
        """Per group: its first `grid_rows` categories (rows) x the scales (columns)."""
        at = {(im.scale, im.group, im.category): im.index for im in images if im.in_grid}
        grids = {}
        for g in cats:
            shown = cats[g][: self.grid_rows]
            cells = [pixels[at[s, g, c]] for c in shown for s in self.scales]
            grids[g] = labelled_grid(
                to_pil(torch.stack(cells)),
                shown,
                [scale_key(s) for s in self.scales],
                title=f"{g} categories, seed {self.seeds[0]}; columns: LoRA scale",
            )
        return grids

    # -- Lightning hooks -------------------------------------------------------------
    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.use_ema and find_ema(trainer) is None:
            raise ValueError(
                f"eval.use_ema={self.use_ema} needs an EMA: set callbacks.ema.decay=0.999"
            )
        method = getattr(module, "method", None)
        if not getattr(method, "lora_scale", True) and self.scales != [1.0]:
            log.warning(
                "method=%s has no LoRA scale: the sweep scores the trained model at scale 1.0 "
                "only (eval.scales=%s ignored)", method.name, self.scales,
            )  # fmt: skip
            self.scales = [1.0]
        if self.will_run(trainer.datamodule):
            self.load_models()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self.sweep(trainer, module)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict):
        if self.on_checkpoint:
            result = self.sweep(trainer, module)
            if result is not None:  # pick the best checkpoint later by its own numbers
                checkpoint["sdft_eval"] = result.metrics()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # not on_fit_end: by then Lightning has moved the module back to the CPU
        self.sweep(trainer, module)

    def sweep(self, trainer: L.Trainer, module: L.LightningModule) -> SweepResult | None:
        """Evaluate the module being trained (once per global step), write and log it; with
        `use_ema` its EMA adapter instead (true) or as well (both: `eval_ema/*`, in ema/)."""
        ema = find_ema(trainer) if self.use_ema else None
        if ema is None or self.use_ema == "both":
            result = self._sweep(trainer, module, "eval")
        if ema is not None:
            with ema.applied(module):
                prefix = "eval_ema" if self.use_ema == "both" else "eval"
                ema_result = self._sweep(trainer, module, prefix)
            result = result if self.use_ema == "both" else ema_result
        return result

    def _sweep(self, trainer: L.Trainer, module: L.LightningModule, prefix: str):
        step = trainer.global_step
        if (step, prefix) in self.results:
            return self.results[step, prefix]
        if not self.will_run(trainer.datamodule):
            log.warning("scale sweep skipped: the data module has no categories to prompt")
            return None
        pipe = module.inference_pipeline()
        pipe.set_progress_bar_config(disable=True)
        with eval_modes(module):
            result = self.evaluate(
                pipe,
                trainer.datamodule,
                rank=trainer.global_rank,
                world=trainer.world_size,
                gather=trainer.strategy.all_gather,
                context=module.inference_context,
            )
        self.results[step, prefix] = result
        metrics = {prefix + k.removeprefix("eval"): v for k, v in result.metrics().items()}
        # self.log() is not allowed in on_train_end; the trainer's dict is what
        # sdft.train.run returns and what checkpoint callbacks and sweepers read.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero and prefix != "eval":  # the EMA beside the adapter
            write_results(result, self.out_dir / "ema" / f"step_{step:06d}")
            append_history(self.out_dir / "ema" / "history.csv", step, metrics)
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step)
        elif trainer.is_global_zero:
            files = write_results(result, self.out_dir / f"step_{step:06d}")
            append_history(self.out_dir / "history.csv", step, metrics)
            log_results(result, trainer.loggers, step, files)
            log.info(
                "scale sweep at step %d: best scale %s, image cosine %.4f (%d images, %.1f s)",
                step, metrics["eval/best_scale"], metrics["eval/clip_img_cos_best"],
                result.images, result.seconds,
            )  # fmt: skip
        return result

"""The LightningModule: noise-prediction loss on a frozen SD pipeline with a trainable adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class CheckpointMismatchError(ValueError):
    """A checkpoint made with another method or base model than the current config."""


def check_checkpoint(meta: dict | None, expected: dict, source: str) -> None:
    """Raise unless a checkpoint's `sdft` metadata matches this run's method and base model."""
    if not meta:
        raise CheckpointMismatchError(f"ckpt_path={source!r} is not an sdft checkpoint")
    for key in ("base_model", "method"):
        if meta.get(key) != expected[key]:
            raise CheckpointMismatchError(
                f"ckpt_path={source!r} was trained with {key}={meta.get(key)!r}, "
                f"but this run uses {key}={expected[key]!r}"
            )


class AdapterFineTuner(L.LightningModule):
    """Trains only the adapter that `method` adds to `pipeline`; everything else is frozen and,
    under bf16/fp16 precision, stored in that dtype (the adapter stays fp32)."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        method: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        seed: int = 0,
        noise_offset: float = 0.0,
    ):
        super().__init__()
        self.pipeline = pipeline
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.method = method
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        self.seed, self.noise_offset = seed, noise_offset
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
        method.apply(pipeline)
        self.strict_loading = False  # checkpoints hold the adapter only, not the frozen base

    @property
    def identity(self) -> dict:
        return {"base_model": self.pipeline.name_or_path, "method": self.method.describe()}

    # -- setup -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
        if dtype is None:
            return
        for module in (self.unet, self.vae, self.text_encoder):
            if module is self.vae and dtype == torch.float16:
                continue  # the SD VAE overflows to NaN in fp16
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.make_optimizer(params)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.make_lr_scheduler(optimizer, num_training_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- training --------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]  # (B, 77, D)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        # Noise is a function of (seed, epoch, batch, rank): a resumed run draws what an
        # uninterrupted one would have, whatever RNG state the checkpoint held.
        key = hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(key)

    def diffusion_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """Noise-prediction MSE of one batch; `g` draws the latents' sample, noise and t."""
        with torch.no_grad():
            if "latent_params" in batch:  # cached VAE output: mean and log-variance (B, 8, h, w)
                dist = DiagonalGaussianDistribution(batch["latent_params"].float())
            else:
                pixels = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
                dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            latents = dist.sample(generator=g).float() * self.vae.config.scaling_factor
            # latents: (B, 4, h, w)
        if "encoder_hidden_states" in batch:  # cached text-encoder output (B, 77, D)
            text = batch["encoder_hidden_states"]
        else:
            text = self.encode_prompt(batch["caption"])
        # forward diffusion: pick t, add noise
        noise = torch.randn(latents.shape, generator=g, device=self.device)
        if self.noise_offset:
            offset = torch.randn(latents.shape[:2], generator=g, device=self.device)
            noise = noise + self.noise_offset * offset[..., None, None]
        num_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, num_t, (latents.shape[0],), generator=g, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        # target by the scheduler's parameterisation
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.step_generator(batch_idx))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}: "
                "stopping (lower optim.lr or check the data)"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_train_start(self) -> None:
        # Lightning restarts a resumed epoch's dataloader at its first batch (and skips
        # on_train_epoch_start); make the sampler skip what the checkpoint already trained.
        fit_loop = self.trainer.fit_loop
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if fit_loop.restarted_mid_epoch and hasattr(sampler, "skip_next"):
            done = fit_loop.epoch_loop.batch_progress.current.ready  # counted before the save
            sampler.skip_next(done * self.trainer.train_dataloader.batch_size)

    # -- checkpoints: the adapter and training state, never the frozen base ------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        checkpoint["sdft"] = self.identity

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint(checkpoint.get("sdft"), self.identity, "<checkpoint>")

    # -- inference -------------------------------------------------------------------
    def inference_pipeline(self) -> StableDiffusionPipeline:
        """The trained pipeline with DPM++ 2M, sharing this module's weights."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_adapter(self, out_dir: str | Path) -> list[Path]:
        return self.method.save(self.pipeline, out_dir)

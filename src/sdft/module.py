"""The LightningModule: noise-prediction loss on a frozen SD pipeline with a trainable adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdft.data.sampler import ResumableLoader, ResumableSampler
from sdft.loss import DiffusionLoss
from sdft.optim import eval_mode, is_schedule_free, make_optimizer
from sdft.perf import FastPath


def micro_batch_size(loader: torch.utils.data.DataLoader) -> int:
    """Samples per batch of a loader, also when a batch sampler (aspect-ratio buckets) makes
    its batches."""
    return loader.batch_size or loader.batch_sampler.batch_size


def recount_progress(trainer: L.Trainer, sampler: ResumableSampler) -> None:
    """After a resume from another number of GPUs (or micro-batch size), Lightning's count of
    the epoch's batches is in the saving run's units, and Lightning ends the epoch when that
    count reaches the loader's length: recount it in this run's batches. The sampler already
    starts where the saving run stopped (`rescale_position`)."""
    loader, done = trainer.train_dataloader, sampler.units_trained()  # this rank's units
    batches = done if sampler is loader.batch_sampler else done // micro_batch_size(loader)
    progress = trainer.fit_loop.epoch_loop.batch_progress.current  # restored from the checkpoint
    shift = batches - progress.ready
    for counter in ("ready", "started", "processed", "completed"):
        setattr(progress, counter, getattr(progress, counter) + shift)


@contextlib.contextmanager
def eval_modes(module: torch.nn.Module) -> Iterator[None]:
    """`module.eval()` inside; after, every submodule back in the mode it was in. Not
    `module.train()`: that would also put the frozen UNet (in eval mode since it was loaded)
    in training mode, which a compiled UNet's guards take for a new graph: a recompile of
    tens of seconds after every preview, validation or scale sweep."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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
        loss: DiffusionLoss | None = None,
        fast_path: FastPath | None = None,  # a trainer callback too: it applies the switches
        loraplus_ratio: float | None = None,
    ):
        super().__init__()
        self.pipeline = pipeline
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.method = method
        self.make_optimizer, self.make_lr_scheduler = optimizer, lr_scheduler
        self.loraplus_ratio = loraplus_ratio  # LoRA+: B matrices at ratio x lr
        self.seed = seed
        self.loss = loss or DiffusionLoss()  # plain uniform-timestep MSE
        self.loss.check(self.noise_scheduler)
        self.fast_path = fast_path
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
        method.apply(pipeline)
        # LoRA on the text encoder, or new TI embedding rows: prompts are encoded with grad
        self.trains_text_encoder = any(p.requires_grad for p in self.text_encoder.parameters())
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
        optimizer = make_optimizer(self, self.make_optimizer, self.loraplus_ratio)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.make_lr_scheduler(optimizer=optimizer, num_training_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- training --------------------------------------------------------------------
    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        # a multi-vector TI token stands for all its tokens: "<x>" -> "<x> <x>_1 <x>_2"
        captions = self.pipeline.maybe_convert_prompt(list(captions), self.tokenizer)
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(ids)[0]  # (B, 77, D)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        # Noise is a function of (seed, epoch, batch, rank): a resumed run draws what an
        # uninterrupted one would have, whatever RNG state the checkpoint held.
        key = hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(key)

    def diffusion_loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        """The loss of one batch as `self.loss` says (default: noise-prediction MSE); `g` draws
        the latents' sample, the noise and t."""
        with torch.no_grad():
            if "latent_params" in batch:  # cached VAE output: mean and log-variance (B, 8, h, w)
                dist = DiagonalGaussianDistribution(batch["latent_params"].float())
            else:
                pixels = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
                dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            latents = dist.sample(generator=g).float() * self.vae.config.scaling_factor
            # latents: (B, 4, h, w)
        if "encoder_hidden_states" in batch and not self.trains_text_encoder:  # cached (B, 77, D)
            text = batch["encoder_hidden_states"]
        else:
            text = self.encode_prompt(batch["caption"])
        # forward diffusion: noise and t (conf/loss), then the noisy latents
        noise, t = self.loss.sample(latents, self.noise_scheduler, g)  # (B, 4, h, w), (B,)
        noisy = self.noise_scheduler.add_noise(latents, self.loss.perturb(noise, g), t)
        # target by the scheduler's parameterisation
        target = self.prediction_target(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        # loss: weighted by t as conf/loss says
        if "is_prior" in batch:  # DreamBooth: instance loss + prior_loss_weight x class-image loss
            per_sample = self.loss.per_sample(pred, target, t, self.noise_scheduler)  # (B,)
            prior = batch["is_prior"]  # (B,) bool
            weight = self.method.prior_loss_weight
            return per_sample[~prior].mean() + weight * per_sample[prior].mean()
        return self.loss(pred, target, t, self.noise_scheduler)

    def prediction_target(
        self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet learns to predict: the noise, or the velocity for v models."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def fixed_timestep_loss(
        self, latents: torch.Tensor, noise: torch.Tensor, t: int, text: torch.Tensor
    ) -> torch.Tensor:
        """The plain MSE of each sample (B,) at timestep `t` with the given noise: the
        validation loss (see sdft.eval.validation)."""
        ts = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents, noise, ts)
        pred = self.unet(noisy, ts, encoder_hidden_states=text).sample
        target = self.prediction_target(latents, noise, ts)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))

    def check_finite(self, loss: torch.Tensor | None, batch_idx: int = -1) -> None:
        """Stop on a NaN/inf loss. On the GPU the check reads the previous micro-batch's loss
        through a pinned copy, so the CPU never waits for the GPU to finish a step."""
        pending, self._pending_loss = getattr(self, "_pending_loss", None), None
        if loss is not None:
            where = f"epoch {self.current_epoch}, batch {batch_idx}"
            if loss.device.type != "cuda":
                pending = (loss.detach(), None, where)
            else:
                value = loss.detach().to("cpu", non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self._pending_loss = (value, done, where)
        if pending is not None:
            value, done, where = pending
            if done is not None:
                done.synchronize()
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value.item()} at {where}: stopping "
                    "(lower optim.lr or check the data)"
                )

    def on_train_end(self) -> None:
        self.check_finite(None)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning refuses to clip for fused AdamW under any AMP, but bf16 has no loss
        # scaler: the gradients are already unscaled and clipping them is exact.
        val, algo = gradient_clip_val, gradient_clip_algorithm
        if val and algo in (None, "norm") and "bf16" in str(self.trainer.precision):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, val, foreach=True)
        else:
            super().configure_gradient_clipping(optimizer, val, algo)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with self.compile_stance(len(batch["caption"])):
            loss = self.diffusion_loss(batch, self.step_generator(batch_idx))
        mean = self.mean_over_ranks(loss)
        self.check_finite(mean, batch_idx)
        self.log("train/loss", mean, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def mean_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss averaged over DDP ranks, so every rank logs the same value and a NaN on
        one rank stops all of them at once (rather than leaving the others waiting on it).
        A plain all-reduce: queued on the GPU, no host sync (Lightning's sync_dist adds a
        barrier)."""
        world = self.trainer.world_size
        if world == 1:
            return loss.detach()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        return mean / world

    def train_sampler(self) -> ResumableSampler | None:
        """The training loader's resumable sampler (a batch sampler with aspect-ratio buckets)."""
        loader = self.trainer.train_dataloader
        return loader.resumable if isinstance(loader, ResumableLoader) else None

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # the sampler runs ahead of training (prefetch): tell it what training consumed, which
        # is what a checkpoint records (ResumableLoader.state_dict). Counted here, before the
        # batch trains, because checkpoints are written in callbacks' on_train_batch_end,
        # which Lightning calls before the module's; none is written while a batch is trained.
        if (sampler := self.train_sampler()) is not None:
            sampler.batch_trained(len(batch["caption"]))
        # schedule-free optimizers step only in train mode (they start, and are left by
        # sampling or a resumed checkpoint, in either); a no-op for any other optimizer
        for opt in self.trainer.optimizers:
            if is_schedule_free(opt):
                opt.train()

    def on_train_start(self) -> None:
        if (sampler := self.train_sampler()) is not None and sampler.resumed_from:
            recount_progress(self.trainer, sampler)

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
    def compile_stance(self, batch_size: int | None = None) -> contextlib.AbstractContextManager:
        """The compiled UNet for the training micro-batch, eager for any other shape."""
        if self.fast_path is None:
            return contextlib.nullcontext()
        return self.fast_path.stance(batch_size)

    @contextlib.contextmanager
    def inference_context(self) -> Iterator[None]:
        """For sampling during fit: the trainer's autocast, an eager UNet (see FastPath), and
        a schedule-free optimizer's averaged weights."""
        with self.trainer.precision_plugin.forward_context(), self.compile_stance():
            with eval_mode(self.trainer.optimizers):
                yield

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

    def save_adapter(self, out_dir: str | Path, metadata: dict | None = None) -> list[Path]:
        """Write the adapter files; `metadata` (resolution, data hash, ...) goes into them."""
        meta = {"base_model": self.pipeline.name_or_path, "steps": self.global_step}
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        with eval_mode(optimizers):  # schedule-free: save the averaged weights
            return self.method.save(self.pipeline, out_dir, {**meta, **(metadata or {})})

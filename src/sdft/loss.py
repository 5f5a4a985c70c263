"""The training objective: which timesteps, which noise, and how each sample's error counts.

`conf/loss/default.yaml` is plain uniform-timestep MSE (the DDPM objective). Every option
is off by default and, when on, takes its random numbers from the step's generator `g`, so
a cached or resumed run draws the same ones. The forms follow kohya sd-scripts (scheduled
Huber, debiased estimation, pyramid noise) and the diffusers examples (min-SNR, input
perturbation, timestep bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "snr", "exponential")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "bias_late", "bias_early")


class DiffusionLoss:
    """Samples noise and timesteps for a batch and reduces the prediction error to a loss."""

    def __init__(
        self,
        type: str = "l2",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        snr_gamma: float | None = None,
        debiased: bool = False,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        multires_iterations: int = 0,
        multires_discount: float = 0.3,
        timestep_min: int = 0,
        timestep_max: int | None = None,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        bias_multiplier: float = 2.0,
        bias_portion: float = 0.25,
    ):
        if type not in LOSS_TYPES:
            raise ValueError(f"loss.type={type!r} must be one of {LOSS_TYPES}")
        if huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(
                f"loss.huber_schedule={huber_schedule!r} must be one of {HUBER_SCHEDULES}"
            )
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"loss.timestep_sampling={timestep_sampling!r} must be one of {TIMESTEP_SAMPLINGS}"
            )
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"loss.snr_gamma={snr_gamma} must be > 0 (5 is the paper's), or null")
        if not 0 < huber_c <= 1:
            raise ValueError(f"loss.huber_c={huber_c} must be in (0, 1]")
        if timestep_min < 0 or (timestep_max is not None and timestep_min >= timestep_max):
            raise ValueError(
                f"loss.timestep_min={timestep_min} must be >= 0 and below "
                f"loss.timestep_max={timestep_max}"
            )
        if not 0 < bias_portion <= 1 or bias_multiplier <= 0:
            raise ValueError("loss.bias_portion must be in (0, 1] and loss.bias_multiplier > 0")
        self.type, self.huber_c, self.huber_schedule = type, huber_c, huber_schedule
        self.snr_gamma, self.debiased = snr_gamma, debiased
        self.noise_offset, self.input_perturbation = noise_offset, input_perturbation
        self.multires_iterations, self.multires_discount = multires_iterations, multires_discount
        self.timestep_min, self.timestep_max = timestep_min, timestep_max
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.bias_multiplier, self.bias_portion = bias_multiplier, bias_portion

    def check(self, scheduler: DDPMScheduler) -> None:
        """Raise unless the timestep range fits the model's noise schedule."""
        num_t = scheduler.config.num_train_timesteps
        if self.timestep_max is not None and self.timestep_max > num_t:
            raise ValueError(
                f"loss.timestep_max={self.timestep_max} is past the scheduler's "
                f"num_train_timesteps={num_t}"
            )
        if self.timestep_min >= (self.timestep_max or num_t):
            raise ValueError(
                f"loss.timestep_min={self.timestep_min} leaves no timesteps (< {num_t})"
            )

    # -- sampling ----------------------------------------------------------------------
    def sample(
        self, latents: torch.Tensor, scheduler: DDPMScheduler, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like `latents` (B, C, h, w) and timesteps (B,), drawn from `g` in a fixed
        order: noise, offset, t, pyramid (the first three as the code before these options)."""
        noise = torch.randn(latents.shape, generator=g, device=latents.device)
        if self.noise_offset:  # a per-channel shift: lets the model change mean brightness
            offset = torch.randn(latents.shape[:2], generator=g, device=latents.device)
            noise = noise + self.noise_offset * offset[..., None, None]
        t = self.timesteps(
            latents.shape[0], scheduler.config.num_train_timesteps, g, latents.device
        )
        if self.multires_iterations:
            noise = self.pyramid(noise, g)
        return noise, t

    def timesteps(self, n: int, num_t: int, g: torch.Generator, device) -> torch.Tensor:
        """`n` timesteps in [timestep_min, timestep_max) by `timestep_sampling`."""
        lo, hi = self.timestep_min, self.timestep_max or num_t
        kind = self.timestep_sampling
        if kind == "uniform":
            return torch.randint(lo, hi, (n,), generator=g, device=device)
        if kind == "logit_normal":  # SD3's density: most samples mid-range
            u = compute_density_for_timestep_sampling(
                "logit_normal", n, self.logit_mean, self.logit_std, device=device, generator=g
            )
            return (lo + u * (hi - lo)).long().clamp(lo, hi - 1)
        # bias_late / bias_early: the diffusers examples' timestep bias, the last (first)
        # `bias_portion` of the range drawn `bias_multiplier` times as often
        weights = torch.ones(hi - lo, device=device)
        k = max(1, int(self.bias_portion * (hi - lo)))
        part = slice(hi - lo - k, None) if kind == "bias_late" else slice(0, k)
        weights[part] *= self.bias_multiplier
        return lo + torch.multinomial(weights, n, replacement=True, generator=g)

    def pyramid(self, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """kohya's multi-resolution (pyramid) noise: coarser noise at random scales r^i,
        r in [2, 4), weighted discount^i, added and renormalised to unit std."""
        b, c, h, w = noise.shape
        for i in range(1, self.multires_iterations + 1):
            r = 2 + 2 * torch.rand((), generator=g, device=noise.device).item()
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            coarse = torch.randn((b, c, hn, wn), generator=g, device=noise.device)
            noise = (
                noise + F.interpolate(coarse, (h, w), mode="bilinear") * self.multires_discount**i
            )
            if hn == 1 or wn == 1:
                break
        return noise / noise.std()

    def perturb(self, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The noise that makes the noisy input: input perturbation adds fresh noise that the
        target does not contain (Ning et al. 2023), against exposure bias."""
        if not self.input_perturbation:
            return noise
        extra = torch.randn(noise.shape, generator=g, device=noise.device)
        return noise + self.input_perturbation * extra

    # -- the loss ----------------------------------------------------------------------
    def __call__(
        self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler
    ) -> torch.Tensor:
        """The batch's loss; plain L2 stays the one-call MSE (the same bits as before)."""
        if self.type == "l2" and not self.snr_gamma and not self.debiased:
            return F.mse_loss(pred.float(), target.float())
        return self.per_sample(pred, target, t, scheduler).mean()

    def per_sample(
        self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler
    ) -> torch.Tensor:
        """Each sample's weighted loss, (B,)."""
        pred, target = pred.float(), target.float()
        if self.type == "l2":
            error = F.mse_loss(pred, target, reduction="none")
        else:
            # per-sample threshold, through the identities huber(x, c) = c^2 huber(x/c, 1)
            # and smooth_l1(x, c) = c smooth_l1(x/c, 1); x2 so small errors match L2
            c = self.huber_threshold(t, scheduler).view(-1, 1, 1, 1)
            if self.type == "huber":
                error = 2 * c**2 * F.huber_loss(pred / c, target / c, reduction="none", delta=1.0)
            else:
                error = 2 * c * F.smooth_l1_loss(pred / c, target / c, reduction="none", beta=1.0)
        return error.mean((1, 2, 3)) * self.weights(t, scheduler)

    def huber_threshold(self, t: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
        """kohya's scheduled Huber c(t): constant, or large (L2-like) at low noise falling to
        huber_c at high noise, by SNR or exponentially in t."""
        c = self.huber_c
        if self.huber_schedule == "constant":
            return torch.full(t.shape, c, device=t.device)
        if self.huber_schedule == "exponential":
            alpha = -math.log(c) / scheduler.config.num_train_timesteps
            return torch.exp(-alpha * t.float())
        sigma = compute_snr(scheduler, t).rsqrt()  # sqrt((1 - abar) / abar)
        return (1 - c) / (1 + sigma) ** 2 + c

    def weights(self, t: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
        """Per-sample weights (B,): min-SNR-gamma (Hang et al. 2023) and debiased estimation."""
        w = torch.ones(t.shape, device=t.device)
        if not (self.snr_gamma or self.debiased):
            return w
        snr = compute_snr(scheduler, t)
        v = scheduler.config.prediction_type == "v_prediction"
        if self.snr_gamma and v:  # min(snr, gamma) / (snr + 1)
            w = w * snr.clamp(max=self.snr_gamma) / (snr + 1)
        elif self.snr_gamma:  # min(snr, gamma) / snr, written so that snr = 0 gives 1, not nan
            w = w * (self.snr_gamma / snr).clamp(max=1)
        if self.debiased:  # kohya: snr capped at 1000 (it is inf at t=0)
            snr = snr.clamp(max=1000)
            w = w * (1 / (snr + 1) if v else snr.rsqrt())
        return w

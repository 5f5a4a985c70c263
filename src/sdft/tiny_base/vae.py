"""The tiny base's VAE: SD's AutoencoderKL architecture at factor 4 (32 px drawings -> 4 x 8 x 8
latents), trained on QuickDraw drawings of the base categories with SD's objective less its
perceptual and adversarial terms (two-tone drawings): pixel MSE + a small KL weight."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset

# three blocks: two downsamplings, factor 4; 0.95M weights
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)


def reconstruction_mse(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Per-image MSE (B,) on the [0, 1] pixel scale of the posterior mean's decoding."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return ((rec.clamp(-1, 1) - pixels) / 2).pow(2).mean((1, 2, 3))


def mean_reconstruction_mse(vae: AutoencoderKL, dataset: Dataset, batch_size: int = 256) -> float:
    """`reconstruction_mse` averaged over a dataset of drawings (`pixel_values` items)."""
    loader = DataLoader(dataset, batch_size)
    return torch.cat([reconstruction_mse(vae, b["pixel_values"]) for b in loader]).mean().item()


class VAETrainer(L.LightningModule):
    """Trains `AutoencoderKL(**vae_config)`: loss = MSE(decode(z), x) + kl_weight * KL(q(z|x))."""

    def __init__(self, vae_config: dict | None = None, kl_weight: float = 1e-6, lr: float = 1e-3):
        super().__init__()
        self.vae = AutoencoderKL(**(vae_config or VAE_CONFIG))
        self.kl_weight, self.lr = kl_weight, lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]  # (B, 3, 32, 32) in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        mse, kl = F.mse_loss(rec, x), posterior.kl().mean()
        self.log_dict({"train/mse": mse, "train/kl": kl}, prog_bar=True)
        return mse + self.kl_weight * kl

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        mse = reconstruction_mse(self.vae, batch["pixel_values"]).mean()
        self.log("val/pixel_mse", mse, prog_bar=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr)

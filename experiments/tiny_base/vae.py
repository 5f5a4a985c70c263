"""Train the tiny_qd base's VAE (issue 20) on drawings of the base categories at 32 px:

    python experiments/tiny_base/vae.py data=../shared/data out=models/tiny_qd max_steps=3000

Writes `<out>/vae/` (a diffusers AutoencoderKL folder), `<out>/split.json` (which categories
are "base" and "new"; sdft.tiny_base.split) and `<out>/vae/metrics.json`: the reconstruction
error (pixel MSE on the [0, 1] scale, posterior mean) on unseen drawings of the base categories
and on drawings of the "new" categories, which the VAE never saw. Any key below is an argument.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from sdft.tiny_base.data import RenderedDrawings, pick
from sdft.tiny_base.split import ROOT, category_split
from sdft.tiny_base.vae import VAETrainer, mean_reconstruction_mse

DEFAULTS = dict(
    data="../shared/data",  # QuickDraw npy/ndjson files, searched recursively
    out="models/tiny_qd",
    per_category=20,  # drawings of each base category (the ndjson ones have 25)
    val_per_category=2,  # unseen drawings of each base category: the reported error
    batch_size=64,
    max_steps=3000,
    lr=1e-3,
    kl_weight=1e-6,
    seed=0,
)


def main(argv: list[str]) -> dict:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    out = Path(cfg.out)
    L.seed_everything(cfg.seed)
    split = category_split(cfg.data)
    base = pick(cfg.data, split["base"], cfg.per_category, cfg.val_per_category, cfg.seed)
    sample = str(ROOT / "data" / "quickdraw")
    new = pick(sample, split["new"], 2, cfg.val_per_category, cfg.seed)  # never trained on
    data = RenderedDrawings(base.dataset, split["base"], mirrored=True)
    train = DataLoader(data, cfg.batch_size, shuffle=True, drop_last=True)
    unseen = base.val_datasets()["trained"]  # unseen drawings of the base categories
    val = DataLoader(unseen, 256)
    module = VAETrainer(kl_weight=cfg.kl_weight, lr=cfg.lr)
    trainer = L.Trainer(
        max_steps=cfg.max_steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
        enable_checkpointing=False, val_check_interval=500, check_val_every_n_epoch=None,
        enable_progress_bar=False,
    )  # fmt: skip
    start = time.time()
    trainer.fit(module, train, val)
    vae = module.vae.cpu().eval()
    metrics = {
        "pixel_mse_unseen_base_drawings": mean_reconstruction_mse(vae, unseen),
        "pixel_mse_new_categories": mean_reconstruction_mse(vae, new.dataset),
        "train_drawings": len(base.dataset),
        "steps": cfg.max_steps,
        "train_seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "command": "python experiments/tiny_base/vae.py " + " ".join(argv),
    }
    vae.save_pretrained(out / "vae")
    (out / "vae" / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

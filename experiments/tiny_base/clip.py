"""Train the tiny base's evaluation CLIP pair (`eval=tiny_qd`, issue 20) on drawings of every
category at 32 px, each paired with "a scribble of <category>":

    python experiments/tiny_base/clip.py data=../shared/data out=models/tiny_qd_clip max_steps=1500

Writes `<out>/` (a transformers CLIPModel + CLIPProcessor folder, what `eval.clip_score_model`
and `eval.image_model` take) and `<out>/metrics.json`: the zero-shot top-1 accuracy, among every
category's prompt, on drawings of the repo's sample (`data/quickdraw/`) that training never saw.
Any key below is an argument.
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

from sdft.data.quickdraw import QuickDrawDataModule
from sdft.tiny_base.clip import ClipPairTrainer, clip_processor, zero_shot_accuracy
from sdft.tiny_base.data import RenderedDrawings, pick, sample_drawings
from sdft.tiny_base.split import ROOT

DEFAULTS = dict(
    data="../shared/data",  # QuickDraw npy/ndjson files, searched recursively
    out="models/tiny_qd_clip",
    per_category=20,  # training drawings of each category (the ndjson ones have 25)
    val_per_category=2,  # the sample's unseen drawings of each category: the reported accuracy
    batch_size=128,
    max_steps=1500,
    lr=1e-3,
    seed=0,
    template="a scribble of {category}",
)


def main(argv: list[str]) -> dict:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    out = Path(cfg.out)
    L.seed_everything(cfg.seed)
    categories = sorted(QuickDrawDataModule(str(cfg.data)).category_files())
    prompts = [cfg.template.format(category=c) for c in categories]
    train = pick(cfg.data, categories, cfg.per_category, cfg.val_per_category, cfg.seed)
    trained_keys = {d.key for d in train.dataset.drawings}
    sample = str(ROOT / "data" / "quickdraw")
    held = sample_drawings(
        sample, categories, lambda key: key not in trained_keys, cfg.val_per_category
    )
    data = RenderedDrawings(train.dataset, categories, mirrored=True)
    loader = DataLoader(data, cfg.batch_size, shuffle=True, drop_last=True)
    module = ClipPairTrainer(prompts, lr=cfg.lr)
    trainer = L.Trainer(
        max_steps=cfg.max_steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    start = time.time()
    trainer.fit(module, loader)
    model = module.model.cpu().eval()
    unseen = RenderedDrawings(held, categories)
    accuracy = zero_shot_accuracy(model, unseen.pixels, unseen.labels, prompts)
    metrics = {
        "zero_shot_top1_unseen_drawings": accuracy,
        "chance": 1 / len(categories),
        "categories": len(categories),
        "unseen_drawings": len(held),
        "train_drawings": len(train.dataset),
        "steps": cfg.max_steps,
        "train_seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "command": "python experiments/tiny_base/clip.py " + " ".join(argv),
    }
    model.save_pretrained(out)
    clip_processor().save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "unseen.json").write_text(json.dumps([d.key for d in held.drawings]) + "\n")
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])

"""The tiny base's training data: QuickDraw drawings at 32 px, rendered once into tensors."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from sdft.data.checks import BadSamples
from sdft.data.quickdraw import QuickDrawDataModule, QuickDrawDataset

SIDE = 32  # the tiny base's resolution


def pick(data: str, categories: list[str], per_category: int, val_per_category: int,
         seed: int) -> QuickDrawDataModule:  # fmt: skip
    """`per_category` drawings of each category (and `val_per_category` unseen ones for
    validation), chosen as sdft's QuickDraw data module chooses them."""
    dm = QuickDrawDataModule(
        data, categories=categories, held_out_fraction=0.0, per_category=per_category,
        val_per_category=val_per_category, resolution=SIDE, seed=seed,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def sample_drawings(
    sample: str, categories: list[str], keep: Callable[[str], bool], k: int
) -> QuickDrawDataset:
    """`k` drawings of each category of the QuickDraw folder `sample` whose key `keep`s, among
    25 sampled with seed 0 (an ndjson category has 25 in all): an evaluation's unseen ones."""
    dm = QuickDrawDataModule(sample, resolution=SIDE)
    files, bad, chosen = dm.category_files(), BadSamples("error", sample), []
    for c in categories:
        pool = dm._pick(c, files[c], random.Random(0), bad, count=25)
        chosen += [d for d in pool if keep(d.key)][:k]
    return dm._dataset(chosen)


class RenderedDrawings(Dataset):
    """Every drawing of a QuickDraw dataset rendered once: `pixels` (N, 3, 32, 32) in [-1, 1],
    `labels` (N,) the category's index; with `mirrored`, each also flipped (2N items), as
    sdft's QuickDraw training sees them."""

    def __init__(self, dataset: QuickDrawDataset, categories: list[str], mirrored: bool = False):
        index = {c: i for i, c in enumerate(categories)}
        self.pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        self.labels = torch.tensor([index[d.category] for d in dataset.drawings])
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.labels) * (2 if self.mirrored else 1)

    def __getitem__(self, i: int) -> dict:
        j, flip = (i // 2, i % 2 == 1) if self.mirrored else (i, False)
        pixels = self.pixels[j].flip(-1) if flip else self.pixels[j]
        return {"pixel_values": pixels, "label": self.labels[j]}

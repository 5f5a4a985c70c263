"""Image grids: previews, scale sweeps and the paper's qualitative figures."""

from __future__ import annotations

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (N, 3, H, W) -> N RGB images."""
    return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """`rows` rows of equally many images, row-major, in one image (diffusers' grid)."""
    if len(images) % rows:
        raise ValueError(f"{len(images)} images do not fill {rows} equal rows")
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def labelled_grid(
    images: list[Image.Image], row_labels: list[str], col_labels: list[str], title: str = ""
) -> Image.Image:
    """Images in row-major order under column labels, beside row labels (and a title)."""
    w, h = images[0].size
    font = ImageFont.load_default(size=max(10, min(w, h) // 8))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 6
    label_w = max(measure.textlength(s, font=font) for s in row_labels) + 10
    top = text_h * (2 if title else 1)
    grid = image_grid(images, rows=len(row_labels))
    canvas = Image.new("RGB", (int(label_w) + grid.width, top + grid.height), "white")
    canvas.paste(grid, (int(label_w), top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for j, s in enumerate(col_labels):
        draw.text((label_w + j * w + 3, top - text_h + 2), s, fill="black", font=font)
    for i, s in enumerate(row_labels):
        draw.text((4, top + i * h + h // 2 - text_h // 2), s, fill="black", font=font)
    return canvas

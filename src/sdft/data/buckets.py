"""Aspect-ratio buckets (as kohya sd-scripts): training sizes, multiples of 64, of about
`resolution`^2 pixels each, so wide and tall images train without being cropped square."""

from __future__ import annotations

import math
import random

from PIL import Image

STEP = 64  # SD's VAE divides by 8 and the UNet by 8 more: sides must be multiples of 64


def make_buckets(resolution: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    """All (height, width), multiples of 64 within [min_size, max_size], with h * w at most
    resolution^2 and as large as the step allows, sorted."""
    for name, v in (("resolution", resolution), ("min_bucket_size", min_size)):
        if v % STEP or v <= 0:
            raise ValueError(f"data.{name}={v} must be a positive multiple of {STEP} to bucket")
    if not min_size <= resolution <= max_size:
        raise ValueError(
            f"data.min_bucket_size={min_size} <= data.resolution={resolution} <= "
            f"data.max_bucket_size={max_size} must hold"
        )
    area = resolution * resolution
    buckets = set()
    for w in range(min_size, max_size + 1, STEP):
        h = min(max_size, area // w // STEP * STEP)
        if h >= min_size:
            buckets.update({(h, w), (w, h)})
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log scale) to the image's."""
    ratio = math.log(width / height)
    gaps = [abs(math.log(w / h) - ratio) for h, w in buckets]
    return gaps.index(min(gaps))


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], rng: random.Random | None
) -> Image.Image:
    """Scale `image` (bicubic) to just cover `size` = (height, width), then crop to it:
    centred, or at a random offset drawn from `rng`."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    if rng is None:
        left, top = (rw - w) // 2, (rh - h) // 2
    else:
        left, top = rng.randint(0, rw - w), rng.randint(0, rh - h)
    return image.crop((left, top, left + w, top + h))

"""DreamBooth data: a few images of one subject with an instance prompt holding a rare token
("a sks scribble"), and class images ("a scribble") that the base model generates once.

Each batch holds B instance images and, with prior preservation, B class images, marked by
`is_prior` (the module's loss is instance + prior_loss_weight x prior). Prior preservation is
on when the method has a `prior_loss_weight` > 0 (method=dreambooth_lora) and
`num_class_images` > 0. Class images are cached under `cache_dir`, keyed by base model, class
prompt and sampling settings; a later run (or a killed one) makes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from diffusers import StableDiffusionPipeline
from torch.utils.data import DataLoader, Dataset

from sdft.data.base import write_split
from sdft.data.caption_folder import decode, load_pixels
from sdft.data.checks import MAX_PIXELS, BadSamples, header_size, outside_link
from sdft.data.sampler import ResumableLoader, SeededEpochSampler
from sdft.files import atomic_path

log = logging.getLogger(__name__)


def list_images(folder: Path) -> list[Path]:
    exts = {e.lower() for e in IMAGE_EXTENSIONS}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)


class PromptImages(Dataset):
    """Images of one prompt, as (3, R, R) in [-1, 1] (resized to cover R, then cropped)."""

    def __init__(self, images: list[Path], prompt: str, resolution: int, center_crop: bool):
        self.images, self.prompt = images, prompt
        self.resolution, self.center_crop = resolution, center_crop

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, flip: bool, crop_seed: str) -> dict:
        rng = None if self.center_crop else random.Random(f"{crop_seed}/{i}")  # str: stable
        size = (self.resolution, self.resolution)
        x = load_pixels(str(self.images[i]), size, rng, flip)  # (3, R, R) in [-1, 1]
        return {"pixel_values": x, "caption": self.prompt}


class DreamBoothDataset(Dataset):
    """Sample i: instance image i mod n and, with class images, class image i mod m;
    indexed by (i, flip, epoch) (a random crop is drawn from (seed, epoch, i))."""

    def __init__(self, instance: PromptImages, prior: PromptImages | None, seed: int = 0):
        self.instance, self.prior, self.seed = instance, prior, seed

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior or ()))

    def __getitem__(self, key: tuple) -> dict:
        i, flip, epoch = key
        crop_seed = f"crop/{self.seed}/{epoch}"
        out = {"instance": self.instance.item(i % len(self.instance), flip, crop_seed)}
        if self.prior is not None:
            out["prior"] = self.prior.item(i % len(self.prior), flip, crop_seed + "/prior")
        return out


def collate(items: list[dict]) -> dict:
    """Instance samples first, then class samples; `is_prior` marks the latter."""
    parts = [it["instance"] for it in items] + [it["prior"] for it in items if "prior" in it]
    batch = {
        "pixel_values": torch.stack([p["pixel_values"] for p in parts]),  # (B or 2B, 3, R, R)
        "caption": [p["caption"] for p in parts],
    }
    if len(parts) > len(items):
        batch["is_prior"] = torch.arange(len(parts)) >= len(items)
    return batch


@contextmanager
def adapters_off(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """The base model: peft adapters of the UNet and text encoder disabled for the block."""
    models = [m for m in (pipe.unet, pipe.text_encoder) if getattr(m, "_hf_peft_config_loaded", 0)]
    for m in models:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in models:
            m.enable_adapters()


class DreamBoothDataModule(L.LightningDataModule):
    """Instance images + prompt, and class images made once by the base model."""

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str = "a sks scribble",
        class_prompt: str = "a scribble",
        num_class_images: int = 100,
        class_negative_prompt: str = "",
        class_steps: int = 25,
        class_guidance_scale: float = 7.5,
        class_batch_size: int = 4,
        cache_dir: str = "~/.cache/sdft",
        resolution: int = 512,
        center_crop: bool = True,
        flip: bool = True,
        seed: int = 42,
        batch_size: int = 1,
        num_workers: int = 2,
        max_pixels: int = MAX_PIXELS,
    ):
        super().__init__()
        if not instance_prompt.strip():
            raise ValueError("data.instance_prompt is empty")
        if num_class_images > 0 and not class_prompt.strip():
            raise ValueError("data.class_prompt is empty (or set data.num_class_images=0)")
        if num_class_images < 0:
            raise ValueError(f"data.num_class_images={num_class_images} must be >= 0")
        self.save_hyperparameters(logger=False)
        self.instance_dir = Path(instance_dir).expanduser()
        self.instance: list[Path] | None = None

    # -- instance images: checked before any model is loaded ------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.instance is not None:
            return
        if not self.instance_dir.is_dir():
            raise FileNotFoundError(
                f"data.instance_dir={str(self.instance_dir)!r}: no such directory"
            )
        images = list_images(self.instance_dir)
        if not images:
            raise FileNotFoundError(
                f"data.instance_dir={str(self.instance_dir)!r} holds no instance images "
                f"({', '.join(sorted({e.lower() for e in IMAGE_EXTENSIONS})[:6])}, ...): "
                "DreamBooth needs a few images of the subject"
            )
        bad = BadSamples("error", str(self.instance_dir))
        for path in images:
            refused = outside_link(path, self.instance_dir)
            refused = refused or header_size(path, self.hparams.max_pixels)  # before decoding
            if isinstance(refused, str):
                bad.add(refused)
                continue
            try:
                decode(str(path))
            except Exception as e:  # PIL raises many kinds; name the file either way
                bad.add(f"{path}: unreadable image ({type(e).__name__}: {e})")
        bad.finish(len(images))
        self.instance = images

    def save_split(self, out_dir: str | Path) -> Path:
        """Write the instance images (with their hashes) and prompts beside the run."""
        self.setup("fit")
        hp = self.hparams
        split = {
            "instance_dir": str(self.instance_dir),
            "instance_images": {
                str(p.relative_to(self.instance_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in self.instance
            },
            "instance_prompt": hp.instance_prompt,
            "class_prompt": hp.class_prompt,
            "num_class_images": hp.num_class_images,
        }
        return write_split(out_dir, split)

    # -- class images: generated once by the base model -------------------------------
    def class_image_dir(self, pipe: StableDiffusionPipeline) -> Path:
        hp = self.hparams
        key = {
            "base_model": pipe.name_or_path,
            "prompt": hp.class_prompt,
            "negative": hp.class_negative_prompt,
            "resolution": hp.resolution,
            "steps": hp.class_steps,
            "guidance": hp.class_guidance_scale,
            "seed": hp.seed,
            "sampler": type(pipe.scheduler).__name__,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^0-9a-z]+", "_", hp.class_prompt.lower()).strip("_")[:40]
        return Path(hp.cache_dir).expanduser() / "class_images" / f"{slug}-{digest}"

    @torch.no_grad()
    def make_class_images(self, pipe: StableDiffusionPipeline, autocast=nullcontext) -> Path:
        """Generate the missing class images 0..N-1 (image i from seed + i) with the base
        model, each written atomically; return their folder."""
        hp = self.hparams
        folder = self.class_image_dir(pipe)
        missing = [i for i in range(hp.num_class_images) if not (folder / f"{i:05d}.png").is_file()]
        if not missing:
            return folder
        log.info("generating %d class images for %r in %s", len(missing), hp.class_prompt, folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps(dict(hp), indent=1, default=str))
        device = pipe._execution_device
        with adapters_off(pipe), autocast():
            for start in range(0, len(missing), hp.class_batch_size):
                chunk = missing[start : start + hp.class_batch_size]
                images = pipe(
                    [hp.class_prompt] * len(chunk),
                    negative_prompt=[hp.class_negative_prompt] * len(chunk),
                    num_inference_steps=hp.class_steps,
                    guidance_scale=hp.class_guidance_scale,
                    generator=[torch.Generator(device).manual_seed(hp.seed + i) for i in chunk],
                    height=hp.resolution,
                    width=hp.resolution,
                ).images
                for i, image in zip(chunk, images, strict=True):
                    with atomic_path(folder / f"{i:05d}.png") as tmp:
                        image.save(tmp, format="PNG")
        return folder

    def class_images(self, folder: Path) -> list[Path]:
        return [folder / f"{i:05d}.png" for i in range(self.hparams.num_class_images)]

    def with_prior(self, method: object) -> bool:
        return getattr(method, "prior_loss_weight", 0.0) > 0 and self.hparams.num_class_images > 0

    def dataset(self, class_images: list[Path] | None) -> DreamBoothDataset:
        self.setup("fit")
        hp = self.hparams
        instance = PromptImages(self.instance, hp.instance_prompt, hp.resolution, hp.center_crop)
        prior = None
        if class_images:
            prior = PromptImages(class_images, hp.class_prompt, hp.resolution, hp.center_crop)
        return DreamBoothDataset(instance, prior, hp.seed)

    def train_dataloader(self) -> DataLoader:
        # here, inside fit, the model sits on the training device: class images are made fast
        module, trainer = self.trainer.lightning_module, self.trainer
        class_images = None
        if self.with_prior(module.method):
            pipe = module.inference_pipeline()
            pipe.set_progress_bar_config(disable=True)
            folder = self.class_image_dir(pipe)
            if trainer.is_global_zero:
                self.make_class_images(pipe, trainer.precision_plugin.forward_context)
            trainer.strategy.barrier()
            class_images = self.class_images(folder)
        hp = self.hparams
        dataset = self.dataset(class_images)
        return ResumableLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=SeededEpochSampler(len(dataset), seed=hp.seed, flip=hp.flip, with_epoch=True),
            collate_fn=collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

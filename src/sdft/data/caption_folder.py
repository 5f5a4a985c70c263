"""A folder of images with captions, as most style and subject LoRAs are trained.

Captions come from one of (`data.caption_source`, `auto` picks the first present):
  metadata  `metadata.jsonl` files, `{"file_name": "a.png", "text": "..."}` a line, the
            `datasets` imagefolder convention (file names relative to the metadata file's
            folder, one file per folder, column names configurable); `text` may be a list,
            one caption of it drawn per epoch
  txt       kohya-style sidecars: `a.png` + `a.txt` (several lines: one drawn per epoch)
or `data.caption="a painting in vangogh style"` gives every image of the folder that caption.

Every line and image is checked before training (see `checks.py`). The metadata lines are
parsed here rather than by `load_dataset("imagefolder")`: pyarrow reads the file whole, so
one malformed line fails the load with no line number and cannot be skipped, and mixing a
string and a list of captions fails its type inference. The rows are the same as
imagefolder's (tests/test_data_captions.py compares them); images are decoded by
`datasets.Image` (EXIF rotation applied, RGB).
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from torch.utils.data import Dataset

from sdft.data.base import CachingDataModule, write_split
from sdft.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from sdft.data.checks import (
    MAX_PIXELS,
    BadSamples,
    check_on_bad_sample,
    header_size,
    outside_link,
    utf8_lines,
    warn_duplicates,
)
from sdft.data.sampler import BucketBatchSampler, SeededEpochSampler

TRANSFORM_VERSION = 1  # part of the cache key: bump when the pixels of an image change
SOURCES = ("auto", "metadata", "txt")
DECODE = datasets.Image(mode="RGB")


def decode(path: str):
    return DECODE.decode_example({"path": path, "bytes": None})


def load_pixels(
    path: str, size: tuple[int, int], rng: random.Random | None, flip: bool
) -> torch.Tensor:
    """The image at `path` resized and cropped to `size` (see `resize_and_crop`), mirrored
    if `flip`, as (3, H, W) in [-1, 1]."""
    image = resize_and_crop(decode(path), size, rng)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    return x.flip(-1) if flip else x


@dataclass(frozen=True)
class TagOptions:
    """kohya-style handling of comma-separated tag captions ("1girl, red hair, smiling"):
    the first `keep` tags stay in place, the rest are shuffled and each dropped with
    probability `dropout`; tags are split on `separator` and joined with it plus a space."""

    shuffle: bool = False
    separator: str = ","
    keep: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        tags = [t.strip() for t in caption.split(self.separator)]
        tags = [t for t in tags if t]
        kept, rest = tags[: self.keep], tags[self.keep :]
        if self.shuffle:
            rng.shuffle(rest)
        if self.dropout:
            rest = [t for t in rest if rng.random() >= self.dropout]
        joiner = self.separator if self.separator.isspace() else self.separator.strip() + " "
        return joiner.join(kept + rest)


class CaptionFolderDataset(Dataset):
    """Images as (3, H, W) in [-1, 1] with a caption; indexed by (i, flip[, epoch]).

    `captions[i]` lists sample i's captions; which one, caption dropout, tag shuffling and
    dropout, and a random crop are drawn from (seed, epoch, i), so they are reproducible and
    survive a resume. With `variants` > 0 the tags take one of that many fixed seeded
    orders per caption (what a text cache can hold), else a fresh one each epoch."""

    def __init__(
        self,
        images: list[str],
        captions: list[list[str]],
        sizes: list[tuple[int, int]],
        seed: int,
        crop: str = "center",
        prefix: str = "",
        suffix: str = "",
        dropout: float = 0.0,
        tags: TagOptions = TagOptions(),
        variants: int = 0,
    ):
        self.images, self.captions, self.sizes = images, captions, sizes
        self.seed, self.crop = seed, crop
        self.prefix, self.suffix, self.dropout = prefix, suffix, dropout
        self.tags, self.variants = tags, variants

    def __len__(self) -> int:
        return len(self.images)

    def image_size(self, i: int) -> tuple[int, int]:
        return self.sizes[i]

    def _rng(self, what: str, key: tuple) -> random.Random:
        epoch = key[2] if len(key) > 2 else 0
        return random.Random(f"{what}/{self.seed}/{epoch}/{key[0]}")  # str seeds: stable

    def caption(self, key: tuple) -> str:
        rng = self._rng("caption", key)
        if self.dropout and rng.random() < self.dropout:
            return ""  # unconditional: what classifier-free guidance samples against
        options = self.captions[key[0]]
        k = rng.randrange(len(options))
        text = options[k]
        if self.tags.active:
            if self.variants:
                text = self.tag_variant(key[0], k, rng.randrange(self.variants))
            else:
                text = self.tags.apply(text, self._rng("tags", key))
        return self.prefix + text + self.suffix

    def tag_variant(self, i: int, k: int, v: int) -> str:
        """Variant v of sample i's caption k: the same text in every epoch and every run."""
        rng = random.Random(f"tags/{self.seed}/{i}/{k}/{v}")
        return self.tags.apply(self.captions[i][k], rng)

    def all_captions(self) -> list[str]:
        if self.tags.active and not self.variants:
            raise ValueError("tag shuffling/dropout without variants has no finite caption set")
        if self.tags.active:
            texts = {
                self.tag_variant(i, k, v)
                for i, options in enumerate(self.captions)
                for k in range(len(options))
                for v in range(self.variants)
            }
        else:
            texts = {c for options in self.captions for c in options}
        out = {self.prefix + c + self.suffix for c in texts}
        return sorted(out | ({""} if self.dropout else set()))

    def __getitem__(self, key: tuple) -> dict:
        i, flip = key[0], key[1]
        rng = self._rng("crop", key) if self.crop == "random" else None
        x = load_pixels(self.images[i], self.sizes[i], rng, flip)  # (3, H, W) in [-1, 1]
        return {"pixel_values": x, "caption": self.caption(key)}


class CaptionFolderDataModule(CachingDataModule):
    """Images + captions from a folder (see conf/data/caption_jsonl.yaml for every knob)."""

    def __init__(
        self,
        path: str,
        caption_source: str = "auto",
        caption: str | None = None,
        image_column: str = "file_name",
        caption_column: str = "text",
        caption_prefix: str = "",
        caption_suffix: str = "",
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        tag_separator: str = ",",
        keep_tags: int = 0,
        tag_dropout: float = 0.0,
        caption_variants: int = 8,
        resolution: int = 512,
        crop: str = "center",
        flip: bool = True,
        bucketing: bool = False,
        min_bucket_size: int = 256,
        max_bucket_size: int = 1024,
        seed: int = 42,
        batch_size: int = 4,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        max_pixels: int = MAX_PIXELS,
        cache: bool = False,
        cache_dir: str = "~/.cache/sdft",
        val_fraction: float = 0.0,
        val_path: str | None = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        if val_fraction and val_path:
            raise ValueError("data.val_fraction and data.val_path: give one or the other")
        if caption_source not in SOURCES:
            raise ValueError(f"data.caption_source={caption_source!r} must be one of {SOURCES}")
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop={crop!r} must be 'center' or 'random'")
        if cache and crop == "random":
            raise ValueError("data.cache=true fixes each image's crop: use data.crop=center")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout={caption_dropout} must be in [0, 1)")
        if not 0.0 <= tag_dropout < 1.0:
            raise ValueError(f"data.tag_dropout={tag_dropout} must be in [0, 1)")
        if keep_tags < 0 or not tag_separator:
            raise ValueError(
                f"data.keep_tags={keep_tags} must be >= 0 and data.tag_separator non-empty"
            )
        if cache and (shuffle_tags or tag_dropout) and caption_variants < 1:
            raise ValueError(
                "data.cache=true with data.shuffle_tags/tag_dropout encodes a fixed set of "
                f"captions: data.caption_variants={caption_variants} must be >= 1"
            )
        if caption is not None and not caption.strip():
            raise ValueError("data.caption is empty: give a caption, or null to read them")
        check_on_bad_sample(on_bad_sample)
        if not isinstance(max_pixels, int) or max_pixels <= 0:
            raise ValueError(f"data.max_pixels={max_pixels!r} must be a positive integer")
        self.save_hyperparameters(logger=False)
        self.path = Path(path).expanduser()
        self.dataset: CaptionFolderDataset | None = None
        self.val_dataset: CaptionFolderDataset | None = None  # for the validation loss
        self.buckets: list[tuple[int, int]] = []
        self.bucket_of: list[int] = []
        self.sources: list[Path] = []  # caption files read
        self.skipped = 0

    # -- reading captions --------------------------------------------------------------
    def _source(self) -> str:
        hp = self.hparams
        if hp.caption is not None:
            return "fixed"
        if hp.caption_source != "auto":
            return hp.caption_source
        if any(self.path.rglob("metadata.jsonl")):
            return "metadata"
        if any(self.path.rglob("*.txt")):
            return "txt"
        raise FileNotFoundError(
            f"data.path={str(self.path)!r} has no metadata.jsonl and no .txt captions "
            "(or set data.caption=... to give every image one caption)"
        )

    def _image_files(self) -> list[Path]:
        exts = set(IMAGE_EXTENSIONS)
        return sorted(f for f in self.path.rglob("*") if f.suffix.lower() in exts)

    def _read_metadata(self, bad: BadSamples) -> list[tuple[str, Path, object]]:
        """(where, image path, caption value) of every parsed line; bad lines go to `bad`."""
        hp = self.hparams
        rows, columns_seen = [], set()
        self.sources = sorted(self.path.rglob("metadata.jsonl"))
        if not self.sources:
            raise FileNotFoundError(f"data.path={str(self.path)!r}: no metadata.jsonl")
        for meta in self.sources:
            for n, line in utf8_lines(meta, bad):
                if not line.strip():
                    continue
                where = f"{meta}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.add(f"{where}: malformed JSON line ({e.msg}: column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    bad.add(f"{where}: not a JSON object")
                    continue
                columns_seen |= set(obj)
                missing = [c for c in (hp.image_column, hp.caption_column) if c not in obj]
                if missing:
                    bad.add(f"{where}: no {missing[0]!r} (it has {sorted(obj)})")
                    continue
                name = obj[hp.image_column]
                rel = os.path.normpath(name) if isinstance(name, str) and name else ""
                if not rel or os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
                    # as imagefolder: a path inside the metadata file's folder, no escaping
                    bad.add(f"{where}: {hp.image_column}={name!r} is not a path in {meta.parent}")
                    continue
                rows.append((where, meta.parent / rel, obj[hp.caption_column]))
        for column in (hp.image_column, hp.caption_column):
            if columns_seen and column not in columns_seen:  # a setting, not a bad sample
                key = "image_column" if column == hp.image_column else "caption_column"
                raise ValueError(
                    f"data.{key}={column!r} is not a column of {self.sources[0]} "
                    f"(its columns: {sorted(columns_seen)})"
                )
        return rows

    def _read_sidecars(self, bad: BadSamples) -> list[tuple[str, Path, object]]:
        rows = []
        for image in self._image_files():
            txt = image.with_suffix(".txt")
            if not txt.is_file():
                bad.add(f"{image}: no caption file {txt.name}")
                continue
            try:
                lines = [s.strip() for s in txt.read_text(encoding="utf-8").splitlines()]
            except UnicodeDecodeError as e:
                bad.add(f"{txt}: not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start})")
                continue
            self.sources.append(txt)
            rows.append((str(txt), image, [s for s in lines if s] or ""))
        return rows

    @staticmethod
    def _captions(value: object) -> list[str] | str:
        """A caption value as a non-empty list of non-empty strings, or what is wrong."""
        options = value if isinstance(value, list) else [value]
        if not options or not all(isinstance(c, str) for c in options):
            return f"caption {value!r} is not a string or a list of strings"
        if not all(c.strip() for c in options):
            return "empty caption"
        return [c.strip() for c in options]

    # -- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read and check every sample, assign buckets; idempotent."""
        if self.dataset is not None:
            return
        hp = self.hparams
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.path={str(self.path)!r}: no such directory")
        bad = BadSamples(hp.on_bad_sample, str(self.path))
        source = self._source()
        if source == "metadata":
            rows = self._read_metadata(bad)
        elif source == "txt":
            rows = self._read_sidecars(bad)
        else:
            rows = [(str(f), f, hp.caption) for f in self._image_files()]
        checked = []
        for where, image, value in rows:
            captions = self._captions(value)
            if isinstance(captions, str):
                bad.add(f"{where}: {captions}")
            elif not image.is_file():
                bad.add(f"{where}: missing image {image}")
            elif escape := outside_link(image, self.path):
                bad.add(f"{where}: {escape}")
            else:
                checked.append((where, image, captions))
        warn_duplicates([(where, image) for where, image, _ in checked])
        # decode every image once (threads: PIL releases the GIL); the folder is only read
        with ThreadPoolExecutor(8) as pool:
            sizes = list(pool.map(lambda r: _size_or_error(r[1], hp.max_pixels), checked))
        good = []
        for (where, image, captions), size in zip(checked, sizes, strict=True):
            if isinstance(size, str):
                bad.add(f"{where}: {size}")
            else:
                good.append((image, captions, size))
        self.skipped = bad.finish(len(good) + len(bad))
        good, held = self._split_val(good)
        self._make_dataset(good)
        if held:
            self.val_dataset = self._val_dataset(held)

    def _split_val(self, good: list) -> tuple[list, list]:
        """(training rows, validation rows): a seeded `val_fraction` of the folder (at least
        one image), or all of `val_path` read with the same settings."""
        hp = self.hparams
        if hp.val_path:
            other = CaptionFolderDataModule(**{**hp, "path": hp.val_path, "val_path": None})
            other.setup()
            ds = other.dataset
            return good, list(zip(map(Path, ds.images), ds.captions, ds.sizes, strict=True))
        if not hp.val_fraction:
            return good, []
        n_val = max(1, round(hp.val_fraction * len(good)))
        if n_val >= len(good):
            raise ValueError(
                f"data.val_fraction={hp.val_fraction} of {len(good)} images in "
                f"{str(self.path)!r} leaves no training images"
            )
        held = set(random.Random(f"val/{hp.seed}").sample(range(len(good)), n_val))
        return [r for i, r in enumerate(good) if i not in held], [good[i] for i in sorted(held)]

    def _val_dataset(self, rows: list) -> CaptionFolderDataset:
        """Validation images at the training resolution, center crop, every caption kept."""
        hp = self.hparams
        size = (hp.resolution, hp.resolution)
        images, captions = [str(r[0]) for r in rows], [r[1] for r in rows]
        return CaptionFolderDataset(
            images,
            captions,
            [size] * len(rows),
            hp.seed,
            "center",
            hp.caption_prefix,
            hp.caption_suffix,
        )

    def val_datasets(self) -> dict[str, CaptionFolderDataset]:
        """The validation loss's data (`val_fraction` or `val_path`); empty without either."""
        self.setup()
        return {"held_out": self.val_dataset} if self.val_dataset is not None else {}

    def _make_dataset(self, good: list) -> None:
        hp = self.hparams
        if hp.bucketing:
            self.buckets = make_buckets(hp.resolution, hp.min_bucket_size, hp.max_bucket_size)
            self.bucket_of = [nearest_bucket(h, w, self.buckets) for _, _, (h, w) in good]
        else:
            self.buckets, self.bucket_of = [(hp.resolution, hp.resolution)], [0] * len(good)
        self.dataset = CaptionFolderDataset(
            [str(image) for image, _, _ in good],
            [captions for _, captions, _ in good],
            [self.buckets[b] for b in self.bucket_of],
            seed=hp.seed,
            crop=hp.crop,
            prefix=hp.caption_prefix,
            suffix=hp.caption_suffix,
            dropout=hp.caption_dropout,
            tags=TagOptions(hp.shuffle_tags, hp.tag_separator, hp.keep_tags, hp.tag_dropout),
            variants=hp.caption_variants if hp.cache else 0,  # the cache holds each text
        )

    def train_sampler(self):
        hp = self.hparams
        if hp.bucketing:
            return BucketBatchSampler(
                self.bucket_of, hp.batch_size, seed=hp.seed, flip=hp.flip, with_epoch=True
            )
        return SeededEpochSampler(len(self.dataset), seed=hp.seed, flip=hp.flip, with_epoch=True)

    def save_split(self, out_dir: str | Path) -> Path:
        """Write which images this run trains on (and how many were skipped)."""
        assert self.dataset is not None, "call setup() first"
        images = [os.path.relpath(p, self.path) for p in self.dataset.images]
        record = {"path": str(self.path), "images": images, "skipped": self.skipped}
        return write_split(out_dir, record)

    def cache_signature(self) -> dict:
        hp = self.hparams
        ds = self.dataset
        return {
            "files": [*ds.images, *map(str, self.sources)],
            "samples": [[p, list(s)] for p, s in zip(ds.images, ds.sizes, strict=True)],
            "settings": {
                "data": "caption_folder",
                "version": TRANSFORM_VERSION,
                "captions": ds.all_captions(),  # prefix, suffix, dropout, data.caption
                "crop": hp.crop,
            },
        }


def _size_or_error(path: Path, max_pixels: int) -> tuple[int, int] | str:
    """(height, width) after EXIF rotation, or why the image is refused. The size comes
    from the header, so an image over `max_pixels` is never decoded."""
    size = header_size(path, max_pixels)
    if isinstance(size, str):
        return size
    try:
        decode(str(path))  # a sound header can front broken pixels (a truncated file)
    except Exception as e:  # PIL raises many types for broken files
        return f"unreadable image {path} ({type(e).__name__}: {e})"
    return size

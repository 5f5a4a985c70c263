"""QuickDraw scribbles (Google Creative Lab, CC BY 4.0) as captioned training images.

Reads the dataset's two public formats from one folder (searched recursively; a folder may
mix both, a category's .npy winning over its .ndjson):
  <category>.npy     numpy bitmaps, (N, 784) uint8, white strokes on black, 28x28
  <category>.ndjson  simplified strokes, one JSON drawing a line, coordinates in 0..255
The paper's recipe (Guo & Cao): 100 random categories split 70/30 into trained and
held-out, 20 drawings per trained category, grey -> RGB, bicubic resize, invert to black
on white, random flip, normalise to [-1, 1], caption "a scribble of {category}".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sdft.data.base import CachingDataModule, write_split
from sdft.data.checks import BadSampleError, BadSamples, check_on_bad_sample
from sdft.data.strokes import BITMAP_SIDE, BITMAP_STROKE, check_strokes, render_strokes

__all__ = ["BadSampleError", "Drawing", "QuickDrawDataModule", "QuickDrawDataset"]
RENDER_VERSION = 2  # part of the cache key: bump when the pixels of a drawing change
RENDERS = ("bitmap", "strokes")


@dataclass
class Drawing:
    category: str
    source: Path
    index: int  # row of the .npy file, or line number (1-based) of the .ndjson file
    key: str  # the dataset's key_id for ndjson, "<file>:<row>" for bitmaps
    strokes: list | None = field(default=None, repr=False)  # ndjson: parsed once, in setup


class QuickDrawDataset(Dataset):
    """Drawings as (image in [-1, 1] of shape (3, R, R), caption); indexed by (i, flip)."""

    def __init__(
        self,
        drawings: list[Drawing],
        resolution: int,
        caption_template: str,
        render: str = "bitmap",
        stroke_width: float = 4.0,
    ):
        self.drawings = drawings
        self.resolution = resolution
        self.caption_template = caption_template
        self.render = render
        self.stroke_width = stroke_width
        self._bitmaps: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.drawings)

    def caption(self, key: tuple | int) -> str:
        i = key[0] if isinstance(key, tuple) else key
        return self.caption_template.format(category=self.drawings[i].category)

    def all_captions(self) -> list[str]:
        return sorted({self.caption(i) for i in range(len(self))})

    def image_size(self, i: int) -> tuple[int, int]:
        return self.resolution, self.resolution

    def grey(self, i: int) -> np.ndarray:
        """The raw drawing, white on black uint8: 28x28, or R x R when rendering strokes."""
        d = self.drawings[i]
        if d.source.suffix == ".npy":
            if d.source not in self._bitmaps:
                self._bitmaps[d.source] = np.load(d.source, mmap_mode="r")
            return np.asarray(self._bitmaps[d.source][d.index]).reshape(BITMAP_SIDE, BITMAP_SIDE)
        if self.render == "strokes":
            return render_strokes(d.strokes, self.resolution, self.stroke_width)
        return render_strokes(d.strokes, BITMAP_SIDE, BITMAP_STROKE)

    def __getitem__(self, key: tuple | int) -> dict:
        i, flip = key[:2] if isinstance(key, tuple) else (key, False)
        x = torch.from_numpy(self.grey(i).copy()).float().div(255)[None, None]  # (1, 1, h, w)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bicubic", antialias=True)
        x = (1.0 - x.clamp(0, 1))[0].expand(3, -1, -1)  # invert: black strokes on white, RGB
        if flip:
            x = x.flip(-1)
        return {"pixel_values": (x - 0.5) / 0.5, "caption": self.caption(i)}  # (3, R, R)


class QuickDrawDataModule(CachingDataModule):
    """The paper's QuickDraw recipe; every number is an argument (see conf/data/quickdraw.yaml)."""

    def __init__(
        self,
        path: str,
        num_categories: int = 100,
        held_out_fraction: float = 0.3,
        per_category: int = 20,
        val_per_category: int = 2,
        categories: list[str] | None = None,
        formats: list[str] = ("npy", "ndjson"),
        render: str = "bitmap",
        stroke_width: float = 4.0,
        resolution: int = 512,
        flip: bool = True,
        caption_template: str = "a scribble of {category}",
        seed: int = 42,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_sample: str = "error",
        cache: bool = False,
        cache_dir: str = "~/.cache/sdft",
    ):
        super().__init__()
        if render not in RENDERS:
            raise ValueError(f"data.render={render!r} must be 'bitmap' (28x28) or 'strokes'")
        check_on_bad_sample(on_bad_sample)
        self.save_hyperparameters(logger=False)
        self.path = Path(path).expanduser()
        self.split: dict | None = None
        self.dataset: QuickDrawDataset | None = None
        self.held_out: list[Drawing] = []
        self.val_trained: list[Drawing] = []  # unseen drawings of the trained categories
        self.skipped = 0

    # -- discovery -------------------------------------------------------------------
    def category_files(self) -> dict[str, Path]:
        """Category name (underscores read as spaces) -> file; .npy wins over .ndjson."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.path={str(self.path)!r}: no such directory")
        files: dict[str, Path] = {}
        for ext in sorted(self.hparams.formats, key=lambda e: e != "npy"):
            for f in sorted(self.path.rglob(f"*.{ext}")):
                files.setdefault(f.stem.replace("_", " "), f)
        if not files:
            raise FileNotFoundError(
                f"data.path={str(self.path)!r} holds no QuickDraw files "
                f"(*.{' / *.'.join(self.hparams.formats)})"
            )
        return files

    @staticmethod
    def _count_bitmaps(f: Path) -> int:
        """Drawings in a .npy file; a file that is wrong as a whole stops the run."""
        try:
            arr = np.load(f, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise BadSampleError(f"{f}: not a readable .npy bitmap file ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != BITMAP_SIDE**2 or arr.dtype != np.uint8:
            raise BadSampleError(
                f"{f}: expected a (N, 784) uint8 bitmap array, got {arr.shape} {arr.dtype}"
            )
        return arr.shape[0]

    @staticmethod
    def _read_lines(f: Path) -> list[str]:
        """The lines of an .ndjson file; a file that is not UTF-8 stops the run."""
        try:
            with f.open(encoding="utf-8") as lines:
                return list(lines)
        except UnicodeDecodeError as e:
            raise BadSampleError(f"{f}: not a UTF-8 ndjson file ({e})") from None

    def choose_categories(self, files: dict[str, Path]) -> tuple[list[str], list[str]]:
        hp = self.hparams
        rng = random.Random(hp.seed)
        if hp.categories:
            unknown = [c for c in hp.categories if c not in files]
            if unknown:
                raise ValueError(
                    f"data.categories: {unknown} not in {self.path} "
                    f"(it has {len(files)}, e.g. {sorted(files)[:8]})"
                )
            trained = list(hp.categories)
            rest = sorted(set(files) - set(trained))
            n_held = round(len(trained) * hp.held_out_fraction / (1 - hp.held_out_fraction))
            return trained, rng.sample(rest, min(n_held, len(rest)))
        if hp.num_categories > len(files):
            raise ValueError(
                f"data.num_categories={hp.num_categories} but {self.path} has only "
                f"{len(files)} categories"
            )
        chosen = rng.sample(sorted(files), hp.num_categories)
        n_trained = round(hp.num_categories * (1 - hp.held_out_fraction))
        return chosen[:n_trained], chosen[n_trained:]

    def _pick(
        self,
        category: str,
        f: Path,
        rng: random.Random,
        bad: BadSamples,
        count: int | None = None,
        besides: list[Drawing] = (),
    ) -> list[Drawing]:
        """`count` (default `per_category`) drawings of a category, each checked (bad ones go
        to `bad`); with `besides`, up to `count` drawings that are not among them."""
        if f.suffix == ".npy":
            n = self._count_bitmaps(f)
        else:  # read once: counted, then the chosen lines parsed and checked
            lines = self._read_lines(f)
            numbered = [k for k, line in enumerate(lines, 1) if line.strip()]
            n = len(numbered)
        count = self.hparams.per_category if count is None else count
        taken = {d.index for d in besides if d.source == f}  # rows (.npy) or lines (.ndjson)
        pool = [r for r in range(n) if (r if f.suffix == ".npy" else numbered[r]) not in taken]
        if besides:  # the validation slice: what is left, up to `count`
            count = min(count, len(pool))
        elif count > n:
            raise ValueError(
                f"data.per_category={count} but category {category!r} has only {n} drawings ({f})"
            )
        rows = sorted(rng.sample(pool, count))  # = sample(range(n)) when nothing is taken
        if f.suffix == ".npy":
            return [Drawing(category, f, r, f"{f.name}:{r}") for r in rows]
        out = []
        for r in rows:
            line = numbered[r]
            try:
                obj = json.loads(lines[line - 1])
                strokes = check_strokes(obj)
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                bad.add(f"{f}:{line}: malformed drawing ({e})")
                continue
            key = str(obj.get("key_id", f"{f.name}:{line}"))
            out.append(Drawing(category, f, line, key, strokes))
        return out

    # -- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Choose the split and check every chosen drawing; idempotent."""
        if self.dataset is not None:
            return
        hp = self.hparams
        files = self.category_files()
        trained, held_out = self.choose_categories(files)
        bad = BadSamples(hp.on_bad_sample, str(self.path))
        rng = random.Random(hp.seed + 1)
        drawings = [d for c in trained for d in self._pick(c, files[c], rng, bad)]
        n_trained_bad = len(bad)
        rng = random.Random(hp.seed + 2)  # its own stream: the trained drawings stay put
        self.held_out = [d for c in held_out for d in self._pick(c, files[c], rng, bad)]
        self.skipped = bad.finish(len(drawings) + len(self.held_out) + len(bad))
        # validation: drawings the training never sees; a bad one is left out unreported, as
        # the lines that no split chooses always were
        rng, unreported = random.Random(hp.seed + 3), BadSamples("error", str(self.path))
        self.val_trained = [
            d
            for c in trained
            for d in self._pick(c, files[c], rng, unreported, hp.val_per_category, drawings)
            if hp.val_per_category
        ]
        if not drawings:
            raise BadSampleError(f"no usable drawings of the trained categories in {self.path}")
        self.split = {
            "seed": hp.seed,
            "trained": trained,
            "held_out": held_out,
            "files": {c: str(files[c]) for c in trained + held_out},
            "drawings": {c: [d.key for d in drawings if d.category == c] for c in trained},
            "held_out_drawings": {
                c: [d.key for d in self.held_out if d.category == c] for c in held_out
            },
            "val_drawings": {
                c: [d.key for d in self.val_trained if d.category == c] for c in trained
            },
            "skipped": n_trained_bad,
            "skipped_held_out": self.skipped - n_trained_bad,
        }
        self.dataset = self._dataset(drawings)

    def _dataset(self, drawings: list[Drawing]) -> QuickDrawDataset:
        hp = self.hparams
        return QuickDrawDataset(
            drawings, hp.resolution, hp.caption_template, hp.render, hp.stroke_width
        )

    def reference_dataset(self, which: str = "held_out") -> QuickDrawDataset:
        """The split's `trained` or `held_out` drawings (no flip), e.g. as evaluation's
        ground truth for the categories never trained on."""
        self.setup()
        if which not in ("trained", "held_out"):
            raise ValueError(f"which={which!r} must be 'trained' or 'held_out'")
        return self.dataset if which == "trained" else self._dataset(self.held_out)

    def val_datasets(self) -> dict[str, QuickDrawDataset]:
        """The validation loss's data: `val_per_category` drawings of each held-out category
        and, reported apart, as many unseen drawings of each trained category."""
        self.setup()
        k = self.hparams.val_per_category
        per_category = {
            c: [d for d in self.held_out if d.category == c] for c in self.split["held_out"]
        }
        first = [d for drawings in per_category.values() for d in drawings[:k]]
        return {"held_out": self._dataset(first), "trained": self._dataset(self.val_trained)}

    def save_split(self, out_dir: str | Path) -> Path:
        """Write the category split beside the run's outputs, so evaluation reuses it."""
        assert self.split is not None, "call setup() first"
        return write_split(out_dir, self.split)

    def cache_signature(self) -> dict:
        hp = self.hparams
        drawings = self.dataset.drawings
        return {
            "files": sorted({str(d.source) for d in drawings}),
            "samples": [[str(d.source), d.index] for d in drawings],
            "settings": {
                "data": "quickdraw",
                "version": RENDER_VERSION,
                "resolution": hp.resolution,
                "render": hp.render,
                "stroke_width": hp.stroke_width if hp.render == "strokes" else None,
                "caption_template": hp.caption_template,
            },
        }

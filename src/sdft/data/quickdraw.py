"""QuickDraw scribbles (Google Creative Lab, CC BY 4.0) as captioned training images.

Reads the dataset's two public formats from one folder (searched recursively):
  <category>.npy     numpy bitmaps, (N, 784) uint8, white strokes on black, 28x28
  <category>.ndjson  simplified strokes, one JSON drawing a line, coordinates in 0..255
The paper's recipe (Guo & Cao): 100 random categories split 70/30 into trained and
held-out, 20 drawings per trained category, grey -> RGB, bicubic resize, invert to black
on white, random flip, normalise to [-1, 1], caption "a scribble of {category}".
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from sdft.data.sampler import SeededEpochSampler

log = logging.getLogger(__name__)
BITMAP_SIDE = 28


@dataclass
class Drawing:
    category: str
    source: Path
    index: int  # row of the .npy file, or line number (1-based) of the .ndjson file
    key: str  # the dataset's key_id for ndjson, "<file>:<row>" for bitmaps


class BadSampleError(ValueError):
    """Raised before training when input data is malformed (names file and line)."""


def render_strokes(strokes: list, size: int, stroke_width: float) -> np.ndarray:
    """Rasterise simplified strokes (0..255 box) into a size x size uint8 image, white on
    black like the bitmap files; drawn 4x larger and downsampled for anti-aliasing."""
    ss = 4
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    scale = (size * ss - 1) / 255.0
    width = max(1, round(stroke_width * ss))
    for xs, ys, *_ in strokes:
        pts = [(x * scale, y * scale) for x, y in zip(xs, ys, strict=True)]
        if len(pts) == 1:
            pts = pts * 2
        draw.line(pts, fill=255, width=width, joint="curve")
        r = width / 2
        for x, y in (pts[0], pts[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def _check_strokes(obj: object) -> list:
    strokes = obj.get("drawing") if isinstance(obj, dict) else None
    if not isinstance(strokes, list) or not strokes:
        raise ValueError("no 'drawing' list of strokes")
    for s in strokes:
        if not (isinstance(s, list) and len(s) >= 2 and len(s[0]) == len(s[1]) and s[0]):
            raise ValueError("a stroke is not [[x...], [y...]] of equal, non-zero length")
    return strokes


class QuickDrawDataset(Dataset):
    """Drawings as (image in [-1, 1] of shape (3, R, R), caption); indexed by (i, flip)."""

    def __init__(
        self,
        drawings: list[Drawing],
        resolution: int,
        caption_template: str,
        render: str = "bitmap",
        stroke_width: float = 3.0,
    ):
        self.drawings = drawings
        self.resolution = resolution
        self.caption_template = caption_template
        self.render = render
        self.stroke_width = stroke_width
        self._bitmaps: dict[Path, np.ndarray] = {}
        self._lines: dict[Path, list[str]] = {}

    def __len__(self) -> int:
        return len(self.drawings)

    def caption(self, i: int) -> str:
        return self.caption_template.format(category=self.drawings[i].category)

    def grey(self, i: int) -> np.ndarray:
        """The raw drawing, white on black uint8: 28x28, or R x R when rendering strokes."""
        d = self.drawings[i]
        if d.source.suffix == ".npy":
            if d.source not in self._bitmaps:
                self._bitmaps[d.source] = np.load(d.source, mmap_mode="r")
            return np.asarray(self._bitmaps[d.source][d.index]).reshape(BITMAP_SIDE, BITMAP_SIDE)
        if d.source not in self._lines:
            self._lines[d.source] = d.source.read_text(encoding="utf-8").splitlines()
        strokes = json.loads(self._lines[d.source][d.index - 1])["drawing"]
        size = self.resolution if self.render == "strokes" else BITMAP_SIDE
        width = self.stroke_width if self.render == "strokes" else 1.5
        return render_strokes(strokes, size, width)

    def __getitem__(self, key: tuple[int, bool] | int) -> dict:
        i, flip = key if isinstance(key, tuple) else (key, False)
        x = torch.from_numpy(self.grey(i).copy()).float().div(255)[None, None]  # (1, 1, h, w)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bicubic", antialias=True)
        x = (1.0 - x.clamp(0, 1))[0].expand(3, -1, -1)  # invert: black strokes on white, RGB
        if flip:
            x = x.flip(-1)
        return {"pixel_values": (x - 0.5) / 0.5, "caption": self.caption(i)}


class QuickDrawDataModule(L.LightningDataModule):
    """The paper's QuickDraw recipe; every number is an argument (see conf/data/quickdraw.yaml)."""

    def __init__(
        self,
        path: str,
        num_categories: int = 100,
        held_out_fraction: float = 0.3,
        per_category: int = 20,
        categories: list[str] | None = None,
        formats: list[str] = ("npy", "ndjson"),
        render: str = "bitmap",
        stroke_width: float = 3.0,
        resolution: int = 512,
        flip: bool = True,
        caption_template: str = "a scribble of {category}",
        seed: int = 42,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        if render not in ("bitmap", "strokes"):
            raise ValueError(f"data.render={render!r} must be 'bitmap' (28x28) or 'strokes'")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r} must be 'error' or 'skip'")
        self.save_hyperparameters(logger=False)
        self.path = Path(path).expanduser()
        self.split: dict | None = None
        self.dataset: QuickDrawDataset | None = None
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

    def _count(self, f: Path) -> int:
        if f.suffix == ".npy":
            arr = np.load(f, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != BITMAP_SIDE**2 or arr.dtype != np.uint8:
                raise BadSampleError(
                    f"{f}: expected a (N, 784) uint8 bitmap array, got {arr.shape} {arr.dtype}"
                )
            return arr.shape[0]
        return sum(1 for line in f.open(encoding="utf-8") if line.strip())

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

    def _ndjson_drawings(self, category: str, f: Path, rows: list[int]) -> list[Drawing]:
        lines = f.read_text(encoding="utf-8").splitlines()
        numbered = [n for n, line in enumerate(lines, 1) if line.strip()]
        out = []
        for r in rows:
            n = numbered[r]
            try:
                obj = json.loads(lines[n - 1])
                _check_strokes(obj)
            except (json.JSONDecodeError, ValueError, TypeError, IndexError) as e:
                self._bad(f"{f}:{n}: malformed drawing ({e})")
                continue
            out.append(Drawing(category, f, n, str(obj.get("key_id", f"{f.name}:{n}"))))
        return out

    def _bad(self, message: str) -> None:
        if self.hparams.on_bad_sample == "error":
            raise BadSampleError(message + "  (set data.on_bad_sample=skip to skip such samples)")
        self.skipped += 1
        log.warning("skipping bad sample: %s", message)

    # -- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Choose the split and validate every chosen drawing; idempotent."""
        if self.dataset is not None:
            return
        hp = self.hparams
        files = self.category_files()
        trained, held_out = self.choose_categories(files)
        rng = random.Random(hp.seed + 1)
        drawings: list[Drawing] = []
        for c in trained:
            n = self._count(files[c])
            if hp.per_category > n:
                raise ValueError(
                    f"data.per_category={hp.per_category} but category {c!r} has only {n} "
                    f"drawings ({files[c]})"
                )
            rows = sorted(rng.sample(range(n), hp.per_category))
            if files[c].suffix == ".npy":
                drawings += [Drawing(c, files[c], r, f"{files[c].name}:{r}") for r in rows]
            else:
                drawings += self._ndjson_drawings(c, files[c], rows)
        if self.skipped:
            log.warning("skipped %d bad samples of %d", self.skipped, self.skipped + len(drawings))
        if not drawings:
            raise BadSampleError(f"no usable drawings in {self.path}")
        self.split = {
            "seed": hp.seed,
            "trained": trained,
            "held_out": held_out,
            "files": {c: str(files[c]) for c in trained + held_out},
            "drawings": {c: [d.key for d in drawings if d.category == c] for c in trained},
            "skipped": self.skipped,
        }
        self.dataset = QuickDrawDataset(
            drawings, hp.resolution, hp.caption_template, hp.render, hp.stroke_width
        )

    def save_split(self, out_dir: str | Path) -> Path:
        """Write the category split beside the run's outputs, so evaluation reuses it."""
        assert self.split is not None, "call setup() first"
        out = Path(out_dir) / "split.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.split, indent=1))
        tmp.replace(out)
        return out

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        hp = self.hparams
        sampler = SeededEpochSampler(len(self.dataset), seed=hp.seed, flip=hp.flip)
        return DataLoader(
            self.dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

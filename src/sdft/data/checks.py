"""Validation of training data before any model is loaded: bad samples are collected with
the file and line that hold them, then either stop the run (listing the first ones and the
count) or, with `data.on_bad_sample=skip`, are skipped with a warning and counted."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)
ON_BAD_SAMPLE = ("error", "skip")
SHOWN = 10  # offending samples listed in the error; the count covers all of them


class BadSampleError(ValueError):
    """Raised before training when input data is malformed (names file and line)."""


def check_on_bad_sample(value: str) -> None:
    if value not in ON_BAD_SAMPLE:
        raise ValueError(f"data.on_bad_sample={value!r} must be 'error' or 'skip'")


def _by_file_and_line(message: str) -> list:
    # numbers compare as numbers: metadata.jsonl:9 comes before metadata.jsonl:10
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", message)]


class BadSamples:
    """Collects `file[:line]: what is wrong` messages while a dataset is checked."""

    def __init__(self, on_bad_sample: str, source: str):
        check_on_bad_sample(on_bad_sample)
        self.on_bad_sample, self.source = on_bad_sample, source
        self.messages: list[str] = []

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: str) -> None:
        self.messages.append(message)
        if self.on_bad_sample == "skip":
            log.warning("skipping bad sample: %s", message)

    def finish(self, checked: int) -> int:
        """Stop (on_bad_sample=error) if anything was bad; else return the skipped count."""
        n = len(self.messages)
        if n and self.on_bad_sample == "error":
            shown = "\n  ".join(sorted(self.messages, key=_by_file_and_line)[:SHOWN])
            more = f"\n  ... and {n - SHOWN} more" if n > SHOWN else ""
            raise BadSampleError(
                f"{n} bad sample(s) of {checked} in {self.source}:\n  {shown}{more}\n"
                "Fix them, or set data.on_bad_sample=skip to skip such samples."
            )
        if n:
            log.warning("skipped %d bad sample(s) of %d in %s", n, checked, self.source)
        if n == checked:
            raise BadSampleError(f"no usable samples in {self.source} ({n} bad, all skipped)")
        return n


# -- reading a folder someone else made ----------------------------------------------------
MAX_PIXELS = 8192 * 8192  # data.max_pixels: above any camera; 12000^2 px decode to 430 MB
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def utf8_lines(path: Path, bad: BadSamples) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; a line that is not UTF-8 goes to `bad`, named by
    file, line and byte, rather than failing the whole file with a UnicodeDecodeError."""
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(
                f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
            )


def header_size(path: Path, max_pixels: int) -> tuple[int, int] | str:
    """(height, width) after EXIF rotation, read from the file's header without decoding it,
    or why the image is refused: over `max_pixels`, or not an image PIL can open."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in ROTATED:
                width, height = height, width
    except Exception as e:  # PIL raises many types for broken files (a bomb among them)
        return f"unreadable image {path} ({type(e).__name__}: {e})"
    if width * height > max_pixels:
        return (
            f"image {path} is {width}x{height} = {width * height} pixels, over "
            f"data.max_pixels={max_pixels}: refused before decoding (downscale it, or raise "
            "data.max_pixels)"
        )
    return height, width


def outside_link(path: Path, root: Path) -> str | None:
    """Why `path` is refused if it is a symlink (or under one) leading out of `root`."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return f"{path} is a symlink to {target}, outside data.path={str(root)!r}: refused"


def warn_duplicates(images: list[tuple[str, Path]]) -> None:
    """Warn about an image listed more than once: it trains that many times as often."""
    where: dict[Path, list[str]] = {}
    for line, image in images:
        where.setdefault(image.resolve(), []).append(line)
    for image, lines in where.items():
        if len(lines) > 1:
            log.warning(
                "%s is listed %d times (%s): it trains %d times as often as the other images",
                image, len(lines), ", ".join(lines), len(lines),
            )  # fmt: skip

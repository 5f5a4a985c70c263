"""Uploaded images: checked as the data modules check them, copied under the workspace with
sanitised names (the browser's file name never becomes a path), captioned kohya-style
(`a.png` + `a.txt`). The uploaded originals are never modified."""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

from sdft.data.caption_folder import decode

MAX_BYTES = 50 * 2**20  # 50 MiB a file
MAX_SIDE = 8192  # px: larger is a mistake (or a decompression bomb), not training data
MIN_SIDE = 8
EXTENSIONS = {e.lower() for e in IMAGE_EXTENSIONS}


class UploadError(ValueError):
    """A refused upload; the message starts with the file's name."""


def sanitize_name(name: str, max_len: int = 80) -> str:
    """A safe file name from a browser's: no folders (/ or \\), no leading dots, only
    letters, digits, '.', '_' and '-'; the extension kept (lower case)."""
    base = re.split(r"[/\\]", unicodedata.normalize("NFKC", str(name)))[-1]
    base = re.sub(r"[^\w.-]", "_", base, flags=re.ASCII).strip(".")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = stem.strip("._")[: max_len - len(ext) - 1] or "image"
    return f"{stem}.{ext.lower()}" if ext else stem


def check_image(path: str | Path, name: str | None = None) -> tuple[int, int]:
    """(width, height) of a readable image within the limits; else UploadError naming it."""
    path = Path(path)
    name = name or path.name
    if Path(name).suffix.lower() not in EXTENSIONS:
        raise UploadError(f"{name}: not an image file ({', '.join(sorted(EXTENSIONS)[:8])}, ...)")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UploadError(
            f"{name}: {size / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB limit"
        )
    try:
        image = decode(str(path))  # as the data modules read it (EXIF rotation, RGB)
    except Exception as e:  # PIL raises many kinds for a broken file
        raise UploadError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    w, h = image.size
    if max(w, h) > MAX_SIDE or min(w, h) < MIN_SIDE:
        raise UploadError(f"{name}: {w}x{h} px, sides must be {MIN_SIDE}..{MAX_SIDE} px")
    return w, h


def unique_path(folder: Path, name: str) -> Path:
    path = folder / name
    stem, suffix = path.stem, path.suffix
    i = 1
    while path.exists():
        path = folder / f"{stem}_{i}{suffix}"
        i += 1
    return path


def store_uploads(
    files: list[str | Path], folder: str | Path, caption: str = "", names: list[str] | None = None
) -> list[Path]:
    """Check every file first (one bad file refuses the batch, naming it), then copy each
    into `folder` under a sanitised unique name with a `.txt` caption beside it."""
    folder = Path(folder)
    names = names or [Path(f).name for f in files]
    for f, name in zip(files, names, strict=True):
        check_image(f, name)
    folder.mkdir(parents=True, exist_ok=True)
    stored = []
    for f, name in zip(files, names, strict=True):
        dest = unique_path(folder, sanitize_name(name))
        shutil.copyfile(f, dest)
        write_caption(dest, caption)
        stored.append(dest)
    return stored


def write_caption(image: Path, text: str) -> Path:
    path = image.with_suffix(".txt")
    path.write_text(text.strip() + "\n")
    return path


def list_images(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) for each image in the folder, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in EXTENSIONS:
            txt = p.with_suffix(".txt")
            out.append((p, txt.read_text().strip() if txt.is_file() else ""))
    return out


def inside(folder: str | Path, name: str) -> Path:
    """`folder/name` if that stays inside `folder` (a name from the page is untrusted)."""
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if path.parent != folder:
        raise UploadError(f"{name}: not a file of {folder}")
    return path


def delete_image(folder: str | Path, name: str) -> None:
    path = inside(folder, name)
    path.unlink(missing_ok=True)
    path.with_suffix(".txt").unlink(missing_ok=True)


def delete_all(folder: str | Path) -> None:
    for image, _ in list_images(folder):
        delete_image(folder, image.name)

"""Writing files so that neither a crash nor a reader running alongside (parallel sweep
trials, DDP ranks) ever sees a half-written or clobbered file."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary file onto `target` in one rename, with the mode a plain
    `open(target, "w")` would give it (0666 less the umask): writers such as safetensors make
    private 0600 files, which would hide a shared run folder's adapters from its group."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


@contextmanager
def atomic_output(target: Path) -> Iterator[str]:
    """Yield a temporary folder beside `target`; the file named `target.name` written
    there replaces `target` in one rename when the block succeeds. For writers that take a
    folder and a file name (diffusers' `save_lora_weights`); `atomic_path` for the rest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        yield tmp_dir
        publish(Path(tmp_dir) / target.name, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A private temporary file beside `path` to write, then moved onto `path` in one step:
    readers see the old file or the new one. A block that fails leaves `path` as it was and
    no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)

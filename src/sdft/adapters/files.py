"""Writing adapter files so that a crash never leaves a half-written or clobbered file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(target: Path) -> Iterator[str]:
    """Yield a temporary folder beside `target`; the file named `target.name` written
    there replaces `target` in one rename when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        yield tmp_dir
        os.replace(Path(tmp_dir) / target.name, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

"""Validation of training data before any model is loaded: bad samples are collected with
the file and line that hold them, then either stop the run (listing the first ones and the
count) or, with `data.on_bad_sample=skip`, are skipped with a warning and counted."""

from __future__ import annotations

import logging
import re

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

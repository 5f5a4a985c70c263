"""What sdft's image-caption datamodules share: the seeded resumable sampler and the latent
cache. A subclass validates its data and sets `self.dataset` in `setup()`, and says what
its cache depends on in `cache_signature()`."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sdft.data.cache import build_or_load
from sdft.data.sampler import ResumableLoader, SeededEpochSampler
from sdft.files import write_atomic

log = logging.getLogger(__name__)


def write_split(out_dir: str | Path, record: dict) -> Path:
    """Write `record` as `<out_dir>/split.json`, atomically (a reader sees all or nothing)."""
    out = Path(out_dir) / "split.json"
    write_atomic(out, json.dumps(record, indent=1))
    return out


class CachingDataModule(L.LightningDataModule):
    """Expects hparams `seed`, `flip`, `batch_size`, `num_workers`, `cache`, `cache_dir`."""

    dataset: Dataset | None = None
    _pipeline = None
    _cached: Dataset | None = None

    def cache_signature(self) -> dict:
        """`files` (paths whose size/mtime matter), `samples`, `settings` (transforms)."""
        raise NotImplementedError

    def prepare_cache(self, pipeline) -> None:
        """Give the pipeline whose VAE and text encoder fill the cache (if `data.cache`).

        The encoding itself waits for `train_dataloader()`, inside `trainer.fit`: by then the
        models sit on the training device in the training dtype, and under DDP the process
        group exists, so each rank encodes its share once."""
        self._pipeline = pipeline

    def train_dataset(self) -> Dataset:
        """The dataset training reads: pixels and captions, or cached latents and text."""
        self.setup("fit")
        if not self.hparams.cache:
            return self.dataset
        if self._cached is None:
            if self._pipeline is None:
                raise RuntimeError("data.cache=true: call datamodule.prepare_cache(pipeline) first")
            trainer = self.trainer
            self._cached = build_or_load(
                self.dataset,
                self._pipeline,
                self.hparams.cache_dir,
                self.cache_signature(),
                flip=self.hparams.flip,
                batch_size=self.hparams.batch_size,
                num_workers=self.hparams.num_workers,
                # encode under the autocast that training uses, for the same numbers
                precision=str(trainer.precision) if trainer else "32-true",
                autocast=trainer.precision_plugin.forward_context if trainer else nullcontext,
            )
        return self._cached

    def train_sampler(self) -> Sampler:
        hp = self.hparams
        return SeededEpochSampler(len(self.dataset), seed=hp.seed, flip=hp.flip)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = self.train_dataset()
        sampler = self.train_sampler()
        common = dict(
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        if hasattr(sampler, "batch_size"):  # a batch sampler (aspect-ratio buckets)
            return ResumableLoader(dataset, batch_sampler=sampler, **common)
        return ResumableLoader(dataset, batch_size=hp.batch_size, sampler=sampler, **common)

"""A sampler whose every draw (order and flip) is a function of (seed, epoch): the same
run gives the same batches on any machine, under DDP, and after a resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class SeededEpochSampler(Sampler[tuple[int, bool]]):
    """Yields `(index, flip)`; shuffles per epoch, shards across DDP ranks, can skip ahead.

    Flips are drawn here rather than in the dataset so that they are reproducible and
    survive a resume (dataset workers do not share the main process's RNG state).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, flip: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.epoch = 0
        self._skip = 0  # samples of this rank's share already trained (resume mid-epoch)

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_samples: int) -> None:
        """Start the next iteration `num_samples` into this rank's share of the epoch."""
        self._skip = num_samples

    def __len__(self) -> int:
        rank, world = self._world()
        return -(-self.num_samples // world)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else None
        flips = torch.rand(self.num_samples, generator=g) < 0.5
        if order is None:
            order = torch.arange(self.num_samples)
        rank, world = self._world()
        per_rank = len(self)
        order = torch.cat([order, order[: per_rank * world - self.num_samples]])  # pad evenly
        mine = order[rank::world].tolist()
        skip, self._skip = self._skip, 0
        for i in mine[skip:]:
            yield i, bool(self.flip and flips[i])

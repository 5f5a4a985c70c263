"""Samplers whose every draw (order and flip) is a function of (seed, epoch): the same run
gives the same batches on any machine, under DDP, and after a resume mid-epoch.

Resume: `ResumableLoader` is a DataLoader that Lightning checkpoints (it has `state_dict` /
`load_state_dict`): its sampler's epoch and how much of the epoch training has consumed, which
the training loop reports with `batch_trained` (the sampler itself runs ahead of training, in
prefetching workers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rescale_position(done: int, saved_world: int, world_size: int) -> int:
    """This rank's start in the epoch after a resume: `done` units (samples or batches) of
    each of `saved_world` ranks were trained. Ranks take the epoch's order round-robin, so
    those are its first `done * saved_world` units, whatever the number of ranks now."""
    return done * saved_world // world_size


class ResumableSampler:
    """The resume state both samplers share: the epoch, and how many units (samples or
    batches) of this rank's share of it training consumed. Each count carries its epoch, so
    a new epoch starts from its beginning."""

    epoch = 0
    _done = (0, 0)  # (epoch, units of this rank's share trained in it)
    _skip = (0, 0)  # (epoch, units to skip when iterating it): from load_state_dict
    resumed_from: dict | None = None  # the loaded state (see sdft.module.recount_progress)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def units_trained(self) -> int:
        epoch, done = self._done
        return done if epoch == self.epoch else 0

    def count_trained(self, units: int) -> None:
        self._done = (self.epoch, self.units_trained() + units)

    def rewind(self, state: dict) -> None:
        """Count as trained only what `state` (this run's own `state_dict`) had: a save in
        the middle of an accumulation window must not record the window's micro-batches,
        whose gradients were never applied."""
        self._done = (state["epoch"], state["done"])

    def take_skip(self) -> int:
        """Units to skip at the start of this iteration (once)."""
        (epoch, skip), self._skip = self._skip, (0, 0)
        return skip if epoch == self.epoch else 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "done": self.units_trained(), "world_size": world()[1]}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        done = rescale_position(state["done"], state["world_size"], world()[1])
        self._done = self._skip = (state["epoch"], done)
        self.resumed_from = state


class SeededEpochSampler(ResumableSampler, Sampler[tuple]):
    """Yields `(index, flip)` (or `(index, flip, epoch)` with `with_epoch`); shuffles per epoch,
    shards across DDP ranks, can skip ahead.

    Flips are drawn here rather than in the dataset so that they are reproducible and
    survive a resume (dataset workers do not share the main process's RNG state). The epoch
    lets a dataset draw its own per-epoch choices (which caption of a list, caption dropout)
    from (seed, epoch, index) just as reproducibly.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        flip: bool = True,
        with_epoch: bool = False,
    ):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.with_epoch = with_epoch

    def batch_trained(self, num_samples: int) -> None:
        self.count_trained(num_samples)  # state in samples

    def __len__(self) -> int:
        return -(-self.num_samples // world()[1])

    def epoch_draws(self) -> tuple[list[int], list[bool]]:
        """This epoch's order over all samples (every rank) and each sample's flip."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.num_samples  # randperm before rand: arange draws nothing from g
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=g) < 0.5
        return order.tolist(), [self.flip and f for f in flips.tolist()]

    def key(self, i: int, flip: bool) -> tuple:
        return (i, flip, self.epoch) if self.with_epoch else (i, flip)

    def __iter__(self) -> Iterator[tuple]:
        order, flips = self.epoch_draws()
        rank, size = world()
        per_rank = len(self)
        order = order + order[: per_rank * size - self.num_samples]  # pad evenly
        mine = order[rank::size]
        skip = self.take_skip()
        for i in mine[skip:]:
            yield self.key(i, flips[i])


class BucketBatchSampler(ResumableSampler, Sampler[list[tuple]]):
    """Batches of one aspect-ratio bucket each (kohya-style bucketing), seeded per epoch.

    `buckets[i]` is sample i's bucket. Each epoch takes the `SeededEpochSampler` order of all
    samples, cuts each bucket's samples, in that order, into batches of `batch_size` (the last
    one of a bucket may be smaller), orders the batches by their first sample's position in
    the epoch order, and deals whole batches to the DDP ranks. `self.sampler` is that inner
    sampler: Lightning calls `set_epoch` on `batch_sampler.sampler`, so the epoch reaches it.
    The resume state counts whole batches (a bucket's last batch may be smaller).
    """

    def __init__(
        self,
        buckets: Sequence[int],
        batch_size: int,
        seed: int,
        flip: bool = True,
        with_epoch: bool = False,
    ):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.sampler = SeededEpochSampler(len(buckets), seed, flip=flip, with_epoch=with_epoch)
        # each bucket's samples make ceil(n / batch_size) batches (the last may be smaller)
        self.num_batches = sum(-(-n // batch_size) for n in Counter(self.buckets).values())

    @property
    def epoch(self) -> int:  # Lightning sets the inner sampler's
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batch_trained(self, num_samples: int) -> None:
        self.count_trained(1)  # state in batches

    def __len__(self) -> int:
        return -(-self.num_batches // world()[1])

    def epoch_batches(self) -> list[list[tuple]]:
        """All ranks' batches of this epoch, in training order."""
        order, flips = self.sampler.epoch_draws()
        open_batch: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for i in order:
            batch = open_batch.setdefault(self.buckets[i], [])
            if not batch:
                batches.append(batch)  # placed where its first sample falls in the order
            batch.append(i)
            if len(batch) == self.batch_size:
                del open_batch[self.buckets[i]]
        return [[self.sampler.key(i, flips[i]) for i in b] for b in batches]

    def __iter__(self) -> Iterator[list[tuple]]:
        batches = self.epoch_batches()
        rank, size = world()
        batches = batches + batches[: len(self) * size - len(batches)]  # pad evenly
        skip = self.take_skip()
        yield from batches[rank::size][skip:]


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` (as `sampler` or `batch_sampler`) that Lightning
    saves in and restores from checkpoints."""

    @property
    def resumable(self) -> ResumableSampler:
        inner = self.batch_sampler
        return inner if isinstance(inner, ResumableSampler) else self.sampler

    def state_dict(self) -> dict:
        return self.resumable.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.resumable.load_state_dict(state)

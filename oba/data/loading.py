"""Deterministic loaders: one seeded generator drives shuffling, workers and per-sample augmentation.

* :func:`loader` / :class:`SeededSampler` -- every sample of the dataset, in one process;
* :func:`distributed_loader` / :class:`DistributedSeededSampler` -- this process's part of the dataset under
  :mod:`torch.distributed` (all of it without a process group), e.g. for DDP training with
  :func:`oba.train.fine_tune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from oba.arguments import check_whole_number
from oba.process_group import get_rank, get_world_size

from .datasets import SeededIndex

__all__ = [
    "DistributedSeededSampler",
    "SeededSampler",
    "distributed_loader",
    "loader",
]


def _supports_seeds(dataset: Dataset) -> bool:
    """Whether ``dataset`` takes :class:`SeededIndex` items (as :mod:`oba.data`'s datasets do)."""
    return bool(getattr(dataset, "supports_seeded_index", False))


def _draw_epoch(n: int, shuffle: bool, generator: torch.Generator, with_seeds: bool) -> tuple[list[int], list[int]]:
    """One epoch's order of the ``n`` samples (a permutation if ``shuffle``) and, if ``with_seeds``, one seed in
    ``[0, 2**62)`` per sample *by sample index* (else ``[]``), drawn from ``generator`` in that order."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if not with_seeds:
        return order.tolist(), []
    return order.tolist(), torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64).tolist()


def _data_loader(
    dataset: Dataset,
    sampler: Sampler,
    generator: torch.Generator,
    *,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool,
    persistent_workers: bool,
    collate_fn: Callable[[list[Any]], Any] | None,
) -> DataLoader:
    check_whole_number("batch_size", batch_size)
    check_whole_number("num_workers", num_workers, 0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,  # the workers' seeds
        collate_fn=collate_fn,
    )


# ------------------------------------------------------------------------------------------ one process
class SeededSampler(Sampler):
    """Yields every index once per epoch (shuffled or in order), each with a per-sample seed.

    All randomness comes from ``generator``: per epoch one permutation (if ``shuffle``) and then, if
    ``with_seeds``, one seed in ``[0, 2**62)`` per sample; items are then :class:`SeededIndex` pairs.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, generator: torch.Generator, with_seeds: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.generator = generator
        self.with_seeds = bool(with_seeds)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int | SeededIndex]:
        order, seeds = _draw_epoch(self.num_samples, self.shuffle, self.generator, self.with_seeds)
        if not self.with_seeds:
            yield from order
            return
        for position, i in enumerate(order):
            yield SeededIndex(i, seeds[position])


def loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A deterministic :class:`~torch.utils.data.DataLoader`.

    One ``torch.Generator`` seeded with ``seed`` (available as ``loader.generator``) drives the shuffling,
    the worker seeds and -- for datasets with ``supports_seeded_index`` (all of :mod:`oba.data`'s) -- one seed
    per sample for random augmentation (:class:`SeededSampler`). The same seed therefore gives the same
    batches, epoch after epoch, whatever ``num_workers`` and the global RNG state. Batches are
    ``(images float32 (B, C, H, W), labels int64 (B,))`` for :mod:`oba.data`'s datasets.
    """
    g = torch.Generator()
    g.manual_seed(int(seed))
    sampler = SeededSampler(
        len(dataset),  # type: ignore[arg-type]
        shuffle=shuffle,
        generator=g,
        with_seeds=_supports_seeds(dataset),
    )
    return _data_loader(
        dataset, sampler, g, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=persistent_workers, collate_fn=collate_fn,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ several processes
class DistributedSeededSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` whose items carry per-sample augmentation seeds.

    Per epoch (``set_epoch``; :func:`oba.train.fine_tune` calls it) one permutation of the dataset (if
    ``shuffle``) and one seed per sample are drawn from a generator seeded with ``seed + epoch``: the same on
    every process, whatever the number of processes. Process ``r`` of ``K`` takes positions ``r, r + K, ...``.
    ``num_replicas`` and ``rank`` default to those of the process group (1 and 0 without one).

    Args:
        even: every process gets the same number of samples (DDP training needs it): the order is padded by
            repeating its start, or cut with ``drop_last``. ``even=False``: each sample exactly once, the
            shards differing by at most one (evaluation).
        with_seeds: yield :class:`oba.data.SeededIndex` items (default: when the dataset supports them, as
            :mod:`oba.data`'s do), so random augmentation depends only on ``seed``, the epoch and the sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even: bool = True,
        with_seeds: bool | None = None,
    ) -> None:
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.even = even
        self.with_seeds = _supports_seeds(dataset) if with_seeds is None else with_seeds
        if not even:
            n = len(dataset)  # type: ignore[arg-type]
            self.num_samples = len(range(self.rank, n, self.num_replicas))
            self.total_size = n

    def __iter__(self) -> Iterator[int | SeededIndex]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order, seeds = _draw_epoch(n, self.shuffle, g, self.with_seeds)
        if self.even:
            if self.drop_last:
                order = order[: self.total_size]
            else:
                pad = self.total_size - n
                order += (order * math.ceil(pad / max(n, 1)))[:pad]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if not self.with_seeds:
            return iter(mine)
        return iter([SeededIndex(i, seeds[i]) for i in mine])  # seeds by sample: padding repeats them


def distributed_loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    *,
    even: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over this process's part of ``dataset``
    (:class:`DistributedSeededSampler`; without a process group, all of it).

    ``batch_size`` is per process: K processes train with a global batch of ``K * batch_size``. Use
    ``shuffle=True`` for training, ``shuffle=False, even=False`` for evaluation (each sample once).
    ``fine_tune`` calls ``loader.sampler.set_epoch(epoch)`` at each epoch (do it yourself in your own loop).
    The loader's own generator (``seed + rank``) seeds only the workers.
    """
    sampler = DistributedSeededSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, even=even)
    return _data_loader(
        dataset, sampler, torch.Generator().manual_seed(int(seed) + get_rank()), batch_size=batch_size,
        num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory, persistent_workers=persistent_workers,
        collate_fn=collate_fn,
    )  # fmt: skip

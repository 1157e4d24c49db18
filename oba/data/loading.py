"""Deterministic loaders: one seeded generator drives shuffling, workers and per-sample augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import SeededIndex

__all__ = [
    "SeededSampler",
    "loader",
]


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
        n = self.num_samples
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if not self.with_seeds:
            yield from order.tolist()
            return
        seeds = torch.randint(0, 2**62, (n,), generator=self.generator, dtype=torch.int64)
        for i, s in zip(order.tolist(), seeds.tolist(), strict=True):
            yield SeededIndex(i, s)


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
        with_seeds=bool(getattr(dataset, "supports_seeded_index", False)),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=g,
        collate_fn=collate_fn,
    )

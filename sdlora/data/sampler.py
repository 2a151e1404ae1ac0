"""Batch order as a pure function of (seed, epoch), so training can resume mid-epoch at the exact batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from sdlora.data.sources import DatasetError


class EndlessBatches(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of (epoch, index) keys from `start`; subclasses say what `batch_at` is."""

    start: int
    batches_per_epoch: int

    def batch_at(self, micro_step: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_step = self.start
        while True:
            yield self.batch_at(micro_step)
            micro_step += 1

    def __len__(self) -> int:  # endless; DataLoader asks only for progress estimates
        return self.batches_per_epoch


class ResumableBatchSampler(EndlessBatches):
    """Endless stream of batches of (epoch, index) keys, starting at micro-batch `start`.

    Each epoch is a fresh permutation seeded by (seed, epoch); the last incomplete batch of an epoch is dropped
    so every batch has the same size. With `num_replicas` > 1 each process takes its own slice of each batch.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start: int = 0, num_replicas: int = 1, rank: int = 0
    ):
        global_batch = batch_size * num_replicas
        if num_items < global_batch:
            raise DatasetError(
                f"train.batch_size: {num_items} image(s) cannot fill one batch of {batch_size} x {num_replicas} "
                "process(es); lower the batch size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.num_replicas, self.rank = start, num_replicas, rank
        self.batches_per_epoch = num_items // global_batch
        self._cached: tuple[int, list[int]] = (-1, [])

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_items, generator=generator).tolist())
        return self._cached[1]

    def batch_at(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        global_batch = self.batch_size * self.num_replicas
        chunk = order[position * global_batch : (position + 1) * global_batch]
        mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [(epoch, index) for index in mine]

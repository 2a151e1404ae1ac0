"""Aspect-ratio buckets and a resumable sampler whose batches never mix buckets.

Buckets are (height, width) pairs in multiples of `step` whose area stays within the square training resolution's
pixel budget. Each image goes to the bucket nearest its aspect ratio (in log space, so 2:1 and 1:2 are equally far
from 1:1). Batch order is a pure function of (seed, epoch), like `ResumableBatchSampler`, so resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sdlora.config import ConfigError
from sdlora.data.sampler import EndlessBatches
from sdlora.data.sources import DatasetError

Bucket = tuple[int, int]  # (height, width)
# What a batch must not mix: a bucket, or (bucket, adapter weight) when images train at several weights.
Group = Bucket | tuple[Bucket, float]


def make_buckets(resolution: int, step: int, min_side: int, max_side: int, max_aspect: float) -> list[Bucket]:
    """Landscape buckets (the widest width per height within resolution**2 pixels) and their portrait mirrors."""
    budget = resolution * resolution
    widest: dict[int, int] = {}  # landscape buckets: for each height, the widest width that fits
    for width in range(step * math.ceil(min_side / step), max_side + 1, step):
        height = min(max_side, (budget // width) // step * step)
        if height < min_side or height > width or width / height > max_aspect:
            continue
        widest[height] = max(width, widest.get(height, 0))
    found = {(h, w) for h, w in widest.items()} | {(w, h) for h, w in widest.items()}  # and their portraits
    if not found:
        raise ConfigError(
            f"data.bucketing: no bucket fits resolution {resolution} with step {step}, sides {min_side}..{max_side} "
            f"and max_aspect {max_aspect}; widen min_side/max_side or max_aspect"
        )
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio; ties go to the larger area, then the smaller height."""
    aspect = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - aspect), 12), -b[0] * b[1], b[0]))


def assign_bucket(size: tuple[int, int], buckets: Sequence[Bucket], step: int, upscale: bool) -> Bucket | None:
    """Bucket for an image of (height, width) `size`; None when it is too small for even a `step` bucket.

    Without `upscale`, an image smaller than its bucket gets that bucket scaled down to fit inside it (sides rounded
    down to `step`), so no image is ever enlarged.
    """
    bucket = nearest_bucket(size, buckets)
    if upscale or (size[0] >= bucket[0] and size[1] >= bucket[1]):
        return bucket
    scale = min(size[0] / bucket[0], size[1] / bucket[1])
    height, width = int(bucket[0] * scale) // step * step, int(bucket[1] * scale) // step * step
    return (height, width) if height >= step and width >= step else None


class BucketBatchSampler(EndlessBatches):
    """Endless stream of batches of (epoch, index) keys, each batch from one bucket, starting at micro-batch `start`.
    A bucket here is any group a batch must not mix (`Group`): `bucket_of` gives each item's.

    Per epoch: items are permuted (seeded by seed and epoch), grouped by bucket, cut into global batches (a bucket's
    last partial batch is filled by wrapping around that bucket's own items, so no image is left out), and the
    batches are shuffled. The number of batches per epoch is the same every epoch, so a micro-step maps to one
    (epoch, position). With `num_replicas` > 1 each process takes its own slice of each global batch.
    """

    def __init__(self, bucket_of: Sequence[Group], batch_size: int, seed: int, start: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if not bucket_of:
            raise DatasetError("data.path: no usable images to sample from; run `sdlora dataset check` to see why")
        self.bucket_of = list(bucket_of)
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.num_replicas, self.rank = num_replicas, rank
        self.global_batch = batch_size * num_replicas
        counts: dict[Group, int] = {}
        for bucket in self.bucket_of:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.counts = dict(sorted(counts.items()))
        self.batches_per_epoch = sum(math.ceil(n / self.global_batch) for n in self.counts.values())
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached[0] == epoch:
            return self._cached[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        grouped: dict[Group, list[int]] = {bucket: [] for bucket in self.counts}
        for index in torch.randperm(len(self.bucket_of), generator=generator).tolist():
            grouped[self.bucket_of[index]].append(index)
        batches = []
        for items in grouped.values():
            for begin in range(0, len(items), self.global_batch):
                chunk = items[begin : begin + self.global_batch]
                chunk += [items[i % len(items)] for i in range(self.global_batch - len(chunk))]
                batches.append(chunk)
        order = torch.randperm(len(batches), generator=generator).tolist()
        self._cached = (epoch, [batches[i] for i in order])
        return self._cached[1]

    def batch_at(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        chunk = self.epoch_batches(epoch)[position]
        mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [(epoch, index) for index in mine]

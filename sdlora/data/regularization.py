"""Regularization (prior-preservation) images mixed into training at a set ratio, deterministically per epoch.

DreamBooth (Ruiz et al., 2023) trains a subject together with images of its class, captioned with the class
prompt, so the model keeps what the class looks like. Here an epoch is the training items (with repeats) plus
`slots` regularization items, `slots = round(n_train * ratio / (1 - ratio))`, so the share of regularization samples
over an epoch is the ratio. Each slot has a fixed bucket (slots are spread over the regularization images' buckets
in proportion to how many images each holds), so the samplers and their resumable batch order work unchanged; what
changes per epoch is which regularization image a slot shows: slot j of bucket b at epoch e shows the (e * k_b + j)th
image of an endless stream of seeded permutations of that bucket's images, so a class folder larger than one
epoch's share is used in full over the epochs, and each image once before any repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Bucket = tuple[int, int]


def _spread(total: int, sizes: dict[Bucket, int]) -> dict[Bucket, int]:
    """`total` split over buckets in proportion to `sizes` (largest remainder; ties to the bucket listed first)."""
    whole = sum(sizes.values())
    shares = {bucket: total * size / whole for bucket, size in sizes.items()}
    counts = {bucket: int(share) for bucket, share in shares.items()}
    left = total - sum(counts.values())
    for bucket in sorted(shares, key=lambda b: -(shares[b] - counts[b]))[:left]:
        counts[bucket] += 1
    return counts


class RegularizationMix:
    """Which regularization record each of an epoch's `slots` shows; `pool` holds record indices (with repeats)."""

    def __init__(self, pool: Sequence[int], targets: Sequence[Bucket], n_train: int, ratio: float, seed: int):
        self.seed = seed
        self.by_bucket: dict[Bucket, list[int]] = {}
        for record in pool:
            self.by_bucket.setdefault(targets[record], []).append(record)
        self.by_bucket = dict(sorted(self.by_bucket.items()))
        slots = max(1, round(n_train * ratio / (1.0 - ratio)))
        per_bucket = _spread(slots, {bucket: len(records) for bucket, records in self.by_bucket.items()})
        # slot -> (bucket, its number within the bucket), bucket by bucket
        self.slots = [(bucket, j) for bucket, count in per_bucket.items() for j in range(count)]
        self.per_bucket = per_bucket
        self._orders: dict[tuple[Bucket, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def bucket(self, slot: int) -> Bucket:
        return self.slots[slot][0]

    def record(self, epoch: int, slot: int) -> int:
        bucket, j = self.slots[slot]
        images = self.by_bucket[bucket]
        cycle, at = divmod(epoch * self.per_bucket[bucket] + j, len(images))
        key = (bucket, cycle)
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            number = sorted(self.by_bucket).index(bucket)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * number + cycle + 1)
            self._orders[key] = torch.randperm(len(images), generator=generator).tolist()
        return images[self._orders[key][at]]

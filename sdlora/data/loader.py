"""The training batches: the dataset with its resumable (optionally bucketed) sampler in a torch DataLoader."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from sdlora.data.buckets import BucketBatchSampler
from sdlora.data.dataset import CaptionedImageDataset, collate
from sdlora.data.sampler import ResumableBatchSampler


def training_loader(dataset: CaptionedImageDataset, *, bucketed: bool, batch_size: int, seed: int, start: int,
                    num_workers: int, num_replicas: int, rank: int, device: torch.device) -> DataLoader:
    """Batches from global micro-batch `start` on, in the order an uninterrupted run would see them; with
    `num_replicas` > 1, this process's slice of each global batch. Images trained at other adapter weights
    (`adapter_weight`) are batched like buckets: one weight per batch."""
    if dataset.weighted:
        sampler = BucketBatchSampler(dataset.item_groups(), batch_size, seed, start=start,
                                     num_replicas=num_replicas, rank=rank)
    elif bucketed:
        sampler = BucketBatchSampler(dataset.item_buckets(), batch_size, seed, start=start,
                                     num_replicas=num_replicas, rank=rank)
    else:
        sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start=start,
                                        num_replicas=num_replicas, rank=rank)
    # Its own generator: a DataLoader otherwise draws a seed from torch's global RNG on every iter(), which would
    # shift LoRA-dropout randomness after a resume.
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), **loader_options(num_workers, device),
    )


def loader_options(num_workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader arguments that keep the next batch ready: pinned pages for fast host-to-GPU copies, and workers
    that survive between epochs instead of being respawned (each respawn stalls a step)."""
    options: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=2)
    return options

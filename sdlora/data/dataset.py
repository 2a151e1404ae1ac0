"""The training dataset: records -> tensors, reproducible for a (seed, epoch, index) triple."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import Dataset

from sdlora.data.images import load_rgb
from sdlora.data.sources import ImageRecord
from sdlora.data.transforms import resize_and_crop


class CaptionedImageDataset(Dataset):
    """Items are addressed by (epoch, index) so random crops and flips depend on nothing but the seed.

    That keeps a resumed run, or a run with more data-loader workers, identical to an uninterrupted one.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        crop: str = "center",
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.records = list(records)
        self.size = (resolution, resolution)
        self.crop = crop
        self.flip_probability = 0.5 if random_flip else 0.0
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        pixels, placement = resize_and_crop(load_rgb(record.path), self.size, self.crop, rng, self.flip_probability)
        return {
            "pixel_values": pixels,
            "caption": record.caption,
            "original_size": placement.original_size,
            "crop_top_left": placement.crop_top_left,
            "target_size": placement.target_size,
            "index": index,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "original_sizes": [item["original_size"] for item in items],
        "crop_top_lefts": [item["crop_top_left"] for item in items],
        "target_sizes": [item["target_size"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
    }

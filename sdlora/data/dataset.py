"""The training dataset: records -> tensors (or cached encodings), reproducible for a (seed, epoch, item) triple."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from sdlora.data.captions import build_caption
from sdlora.data.images import ImageLoadError, load_rgb
from sdlora.data.sources import ImageRecord
from sdlora.data.transforms import apply_placement, plan_crop

log = logging.getLogger(__name__)


class CaptionedImageDataset(Dataset):
    """Items are addressed by (epoch, item) so crops, flips and caption choices depend on nothing but the seed.

    That keeps a resumed run, or a run with more data-loader workers, identical to an uninterrupted one. An image
    with `repeats` r is r items per epoch. With a latent cache (`latent_cache`) items carry the cached VAE
    distribution instead of pixels, and with a text cache (`text_cache`) the cached text-encoder output.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        crop: str = "center",
        random_flip: bool = False,
        seed: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        self.records = list(records)
        self.size = (resolution, resolution)
        self.targets = list(buckets) if buckets is not None else [self.size] * len(self.records)
        self.crop = crop
        self.flip_probability = 0.5 if random_flip else 0.0
        self.seed = seed
        self.background = background
        self.items = [r for r, record in enumerate(self.records) for _ in range(record.repeats)]
        self.latent_cache = None
        self.text_cache = None

    def __len__(self) -> int:
        return len(self.items)

    def item_buckets(self) -> list[tuple[int, int]]:
        """The (height, width) of every item, for `BucketBatchSampler`."""
        return [self.targets[r] for r in self.items]

    def caption(self, epoch: int, item: int) -> str:
        record = self.records[self.items[item]]
        # Its own stream, so enabling a caption option never changes which crop or flip an item gets.
        return build_caption(record.caption, record.captions, random.Random(f"caption:{self.seed}:{epoch}:{item}"))

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, item = key if isinstance(key, tuple) else (0, key)
        index = self.items[item]
        rng = random.Random(f"{self.seed}:{epoch}:{item}")
        caption = self.caption(epoch, item)
        out: dict[str, Any] = {"caption": caption, "index": item, "loss_weight": self.records[index].loss_weight}
        if self.latent_cache is not None:
            record = self.records[index]
            resized, placement = plan_crop(record.size, self.targets[index], self.crop, rng, self.flip_probability)
            out["latent_mean"], out["latent_std"] = self.latent_cache.load(record, resized, placement)
        else:
            image, index = self._load(index)
            resized, placement = plan_crop((image.height, image.width), self.targets[index], self.crop, rng,
                                           self.flip_probability)
            out["pixel_values"] = apply_placement(image, resized, placement)
        if self.text_cache is not None:
            out.update(self.text_cache.load(caption))
        out.update(original_size=placement.original_size, crop_top_left=placement.crop_top_left,
                   target_size=placement.target_size)
        return out

    def _load(self, index: int):
        """Decode an image; one that broke after the preflight is replaced by the next image of the same size."""
        for offset in range(len(self.records)):
            candidate = (index + offset) % len(self.records)
            if self.targets[candidate] != self.targets[index]:
                continue
            try:
                return load_rgb(self.records[candidate].path, self.background), candidate
            except ImageLoadError as exc:
                log.warning("skipping an image that can no longer be read: %s", exc)
        raise ImageLoadError(self.records[index].path, "no image of this bucket can be read any more")


STACKED = ("pixel_values", "latent_mean", "latent_std", "encoder_hidden_states", "pooled_prompt_embeds")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "captions": [item["caption"] for item in items],
        "original_sizes": [item["original_size"] for item in items],
        "crop_top_lefts": [item["crop_top_left"] for item in items],
        "target_sizes": [item["target_size"] for item in items],
        "indices": torch.tensor([item["index"] for item in items]),
        "loss_weights": torch.tensor([float(item["loss_weight"]) for item in items]),
    }
    for key in STACKED:
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch

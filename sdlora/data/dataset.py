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
from sdlora.data.masks import load_mask, place_mask
from sdlora.data.regularization import RegularizationMix
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
        regularization_ratio: float = 0.5,
        prior_loss_weight: float = 1.0,
        masked: bool = False,
        mask_from_alpha: bool = False,
    ):
        self.records = list(records)
        self.size = (resolution, resolution)
        self.targets = list(buckets) if buckets is not None else [self.size] * len(self.records)
        self.crop = crop
        self.flip_probability = 0.5 if random_flip else 0.0
        self.seed = seed
        self.background = background
        # Training items first, then the regularization slots (see regularization.py): which regularization image
        # a slot shows depends on the epoch.
        self.items = [r for r, record in enumerate(self.records) if not record.regularization
                      for _ in range(record.repeats)]
        pool = [r for r, record in enumerate(self.records) if record.regularization for _ in range(record.repeats)]
        self.mix = RegularizationMix(pool, self.targets, len(self.items), regularization_ratio, seed) if pool else None
        self.prior_loss_weight = prior_loss_weight
        self.masked, self.mask_from_alpha = masked, mask_from_alpha
        self.latent_cache = None
        self.text_cache = None
        self.mask_cache = None  # with a latent cache and masks: placed masks by (mask fingerprint, placement)
        self.mask_fingerprints: dict[int, str] = {}  # record index -> masks.mask_fingerprint, filled with the cache

    def __len__(self) -> int:
        return len(self.items) + (len(self.mix) if self.mix is not None else 0)

    def record_index(self, epoch: int, item: int) -> int:
        if item < len(self.items):
            return self.items[item]
        return self.mix.record(epoch, item - len(self.items))

    def item_buckets(self) -> list[tuple[int, int]]:
        """The (height, width) of every item, for `BucketBatchSampler`."""
        slots = [self.mix.bucket(s) for s in range(len(self.mix))] if self.mix is not None else []
        return [self.targets[r] for r in self.items] + slots

    @property
    def weighted(self) -> bool:
        """Some images train at an adapter weight other than 1.0: batches must not mix weights."""
        return any(record.adapter_weight != 1.0 for record in self.records)

    def item_groups(self) -> list[tuple[tuple[int, int], float]]:
        """(bucket, adapter weight) of every item: a batch is drawn from one group, since the adapter has one
        weight per forward pass. Regularization slots train at 1.0."""
        weights = [self.records[r].adapter_weight for r in self.items] + [1.0] * (len(self) - len(self.items))
        return list(zip(self.item_buckets(), weights))

    def fixed_captions(self) -> set[str]:
        """Every caption an item can get when no caption option varies (what a text cache must hold)."""
        return {build_caption(r.caption, r.captions, random.Random(0)) for r in self.records}

    def caption(self, epoch: int, item: int) -> str:
        record = self.records[self.record_index(epoch, item)]
        # Its own stream, so enabling a caption option never changes which crop or flip an item gets.
        return build_caption(record.caption, record.captions, random.Random(f"caption:{self.seed}:{epoch}:{item}"))

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, item = key if isinstance(key, tuple) else (0, key)
        index = self.record_index(epoch, item)
        rng = random.Random(f"{self.seed}:{epoch}:{item}")
        caption = self.caption(epoch, item)
        weight = self.records[index].loss_weight
        if self.records[index].regularization:
            weight = weight * self.prior_loss_weight
        out: dict[str, Any] = {"caption": caption, "index": item, "loss_weight": weight,
                               "adapter_weight": self.records[index].adapter_weight}
        if self.latent_cache is not None:
            record = self.records[index]
            resized, placement = plan_crop(record.size, self.targets[index], self.crop, rng, self.flip_probability)
            out["latent_mean"], out["latent_std"] = self.latent_cache.load(record, resized, placement)
            if self.masked:
                out["mask"] = self._cached_mask(index, resized, placement)
        else:
            image, index = self._load(index)
            resized, placement = plan_crop((image.height, image.width), self.targets[index], self.crop, rng,
                                           self.flip_probability)
            out["pixel_values"] = apply_placement(image, resized, placement)
            if self.masked:
                out["mask"] = self.placed_mask(index, (image.height, image.width), resized, placement)
        if self.text_cache is not None:
            out.update(self.text_cache.load(caption))
        out.update(original_size=placement.original_size, crop_top_left=placement.crop_top_left,
                   target_size=placement.target_size)
        return out

    def placed_mask(self, index: int, size: tuple[int, int], resized, placement, flip: bool | None = None):
        """The record's loss mask placed like its image; all ones for an image without a mask."""
        record = self.records[index]
        mask = load_mask(record.path, record.mask, size, self.mask_from_alpha)
        if mask is None:
            return torch.ones((1, *placement.target_size))
        return place_mask(mask, resized, placement, flip)

    def _cached_mask(self, index: int, resized, placement) -> torch.Tensor:
        fingerprint = self.mask_fingerprints.get(index, "")
        if not fingerprint:
            return torch.ones((1, *placement.target_size))
        return self.mask_cache.load(fingerprint, resized, placement, placement.flipped)

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
        "adapter_weights": torch.tensor([float(item.get("adapter_weight", 1.0)) for item in items]),
    }
    if "mask" in items[0]:
        batch["masks"] = torch.stack([item["mask"] for item in items])
    for key in STACKED:
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch

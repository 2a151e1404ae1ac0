"""Resize, crop and flip an image to a training tensor, recording what was done (SDXL conditions on it)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Placement:
    """Where the training crop came from: the original size and the crop's top-left in the resized image."""

    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (height, width)
    flipped: bool


def plan_crop(
    original_size: tuple[int, int], size: tuple[int, int], crop: str, rng: random.Random, flip_probability: float = 0.0
) -> tuple[tuple[int, int], Placement]:
    """Resized (height, width) and placement for an image of `original_size`, without decoding it.

    The latent cache relies on this: it finds an item's crop and flip from the image size alone.
    """
    height, width = original_size
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    resized_w, resized_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if crop == "random":
        top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
    else:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    flipped = flip_probability > 0 and rng.random() < flip_probability
    return (resized_h, resized_w), Placement((height, width), (top, left), (target_h, target_w), flipped)


def apply_placement(image: Image.Image, resized: tuple[int, int], placement: Placement, flip: bool | None = None):
    """The training tensor for `placement` ([-1, 1] CHW); `flip` overrides the placement's flip (cache variants)."""
    resized_image = image.resize((resized[1], resized[0]), Image.Resampling.LANCZOS)
    (top, left), (target_h, target_w) = placement.crop_top_left, placement.target_size
    cropped = resized_image.crop((left, top, left + target_w, top + target_h))
    if placement.flipped if flip is None else flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(cropped)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())

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


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], crop: str, rng: random.Random, flip_probability: float = 0.0
) -> tuple[torch.Tensor, Placement]:
    """Scale the short side to cover `size` (height, width), crop to it, maybe flip; returns [-1, 1] CHW."""
    target_h, target_w = size
    scale = max(target_h / image.height, target_w / image.width)
    resized_w, resized_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    resized = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    if crop == "random":
        top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
    else:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    flipped = flip_probability > 0 and rng.random() < flip_probability
    if flipped:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(cropped), Placement((image.height, image.width), (top, left), (target_h, target_w), flipped)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())

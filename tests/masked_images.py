"""Images with loss masks for the masked-loss tests (data and training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_masked_images(folder: Path) -> Path:
    """Wide, tall and square images: red where the mask is white, blue where it is black (a different split each,
    none symmetric, so a flip of the image without its mask shows); one image with no mask, one with alpha only."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = (("wide", (120, 72), 40), ("tall", (64, 112), 20), ("square", (80, 80), 56))
    for name, (width, height), red_until in shapes:
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, :red_until, 0] = 255
        pixels[:, red_until:, 2] = 255
        Image.fromarray(pixels).save(folder / f"{name}.png")
        mask = np.zeros((height, width), np.uint8)
        mask[:, :red_until] = 255
        Image.fromarray(mask).save(folder / f"{name}-masklabel.png")
        (folder / f"{name}.txt").write_text(f"a {name} picture", encoding="utf-8")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "unmasked.png")
    alpha = np.zeros((64, 64, 4), np.uint8)
    alpha[:, :, 0] = 255
    alpha[:, :24, 3] = 255  # opaque on the left: the alpha is the mask
    Image.fromarray(alpha, "RGBA").save(folder / "cutout.png")
    return folder

"""Loss masks: which pixels of a training image count (`data.masked_loss`).

A mask is a greyscale image beside its training image named `<stem>-masklabel.png` (OneTrainer's convention, so
folders made for it work unchanged): white trains, black is ignored, grey weighs in between. With
`data.mask_from_alpha`, an image that has no mask file but has an alpha channel uses its alpha (kohya's
`alpha_mask`). A mask is resized to its image's size, then cropped, resized and flipped exactly as the image is,
with the same `Placement`; images without a mask get none (the loss of such an image is unchanged).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlora.data.images import ImageLoadError
from sdlora.data.transforms import Placement

MASK_SUFFIX = "-masklabel.png"


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_file_for(image: Path) -> Path | None:
    candidate = image.with_name(image.stem + MASK_SUFFIX)
    return candidate if candidate.is_file() else None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_mask(image_path: Path, mask_path: Path | None, size: tuple[int, int], from_alpha: bool) -> Image.Image | None:
    """The mask of an image as an 8-bit greyscale image of (height, width) `size`, or None when it has none."""
    source = mask_path
    try:
        if source is not None:
            with Image.open(source) as opened:
                mask = ImageOps.exif_transpose(opened).convert("L")
        elif from_alpha:
            source = image_path
            with Image.open(source) as opened:
                image = ImageOps.exif_transpose(opened)
                if not _has_alpha(image):
                    return None
                mask = image.convert("RGBA").getchannel("A")
        else:
            return None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(source, f"cannot read this loss mask: {exc}") from None
    if (mask.height, mask.width) != size:
        mask = mask.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return mask


def mask_fingerprint(image_path: Path, mask_path: Path | None, from_alpha: bool) -> str:
    """What a cached mask depends on: the mask file's bytes, or the image's when the mask is its alpha."""
    source = mask_path if mask_path is not None else image_path if from_alpha else None
    if source is None:
        return ""
    return ("file:" if mask_path is not None else "alpha:") + hashlib.sha256(Path(source).read_bytes()).hexdigest()


def place_mask(mask: Image.Image, resized: tuple[int, int], placement: Placement, flip: bool | None = None):
    """The mask as a (1, height, width) float tensor in [0, 1], placed like `transforms.apply_placement` places
    the image. Bilinear, not Lanczos: Lanczos rings, and a black area would come out not quite zero near an edge."""
    resized_mask = mask.resize((resized[1], resized[0]), Image.Resampling.BILINEAR)
    (top, left), (target_h, target_w) = placement.crop_top_left, placement.target_size
    cropped = resized_mask.crop((left, top, left + target_w, top + target_h))
    if placement.flipped if flip is None else flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]

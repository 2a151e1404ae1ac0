"""Class images for prior preservation, made by the base model itself (as diffusers' DreamBooth scripts do).

Image i is `sdlora generate --seed SEED+i` of the class prompt, saved as `NNNNN.png` with the prompt in `NNNNN.txt`
beside it, so the folder is a regularization source as it stands (`data.sources: [{path: DIR, regularization:
true}]`). Each image is written whole (a temporary file renamed into place), so an interrupted call leaves only
finished images; called again, it makes only the missing ones, and since an image depends on nothing but the seed
and its index, the folder ends up the same as one made in a single call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdlora.files.atomic import atomic_path, write_text_atomic
from sdlora.inference.pipeline import GenerationSettingError, generate

log = logging.getLogger(__name__)


@dataclass
class ClassImages:
    folder: Path
    made: list[Path]
    kept: list[Path]  # already there from an earlier call


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def make_class_images(load_pipeline: Callable[[], object], prompt: str, count: int, folder: Path, *, seed: int = 0,
                      steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str = "",
                      height: int | None = None, width: int | None = None) -> ClassImages:
    """`count` images of `prompt` in `folder`; the pipeline is loaded (`load_pipeline()`) only if one is missing."""
    if count < 1:
        raise GenerationSettingError(f"--count: must be at least 1, got {count}")
    if not prompt.strip():
        raise GenerationSettingError("--prompt: the class prompt is empty; give the class, e.g. 'a photo of a dog'")
    for index in range(count):  # a folder of another class must not be topped up with this one
        caption = image_path(folder, index).with_suffix(".txt")
        if caption.is_file() and caption.read_text(encoding="utf-8").strip() != prompt.strip():
            raise GenerationSettingError(
                f"--out: {caption} holds another class prompt ({caption.read_text(encoding='utf-8').strip()!r}, not "
                f"{prompt!r}); use another --out folder, or empty this one"
            )
    missing = [index for index in range(count) if not image_path(folder, index).is_file()]
    kept = [image_path(folder, index) for index in range(count) if index not in missing]
    if kept:
        log.info("%s: %d of %d class images already there, making the other %d", folder, len(kept), count,
                 len(missing))
    pipe = load_pipeline() if missing else None
    made = []
    for index in missing:
        image = generate(pipe, prompt, seed=seed + index, steps=steps, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt, height=height, width=width)[0]
        with atomic_path(image_path(folder, index)) as tmp:
            image.save(tmp, format="PNG")
        made.append(image_path(folder, index))
    for index in range(count):  # captions last: an image whose caption was lost gets it back
        caption = image_path(folder, index).with_suffix(".txt")
        if not caption.is_file():
            write_text_atomic(caption, prompt.strip() + "\n")
    return ClassImages(folder, made, kept)

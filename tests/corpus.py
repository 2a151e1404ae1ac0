"""A messy dataset folder like the ones people really have, made by the tests: which file is which is known."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# file -> what `sdlora dataset check` must call it (kind of skip), or None for a usable image
EXPECTED_SKIPS = {
    "cut.jpg": "truncated",
    "empty.png": "empty",
    "notes.png": "not_an_image",
    "square_copy.png": "duplicate",
    "layers.psd": "unsupported",
}
USABLE = ("cmyk.jpg", "exif.jpg", "grey.png", "grey16.png", "nocap.png", "palette.png", "rgba.png", "square.png",
          "tall.jpg", "wide.png")
BACKGROUND = (0, 128, 255)
LONG_CAPTION_FILE = "grey.png"


def _gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    array = (base * (0.3 + 0.7 * x) * (0.5 + 0.5 * y)).clip(0, 255).astype("uint8")
    return Image.fromarray(np.broadcast_to(array, (height, width, 3)).copy(), "RGB")


def make_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _gradient(128, 64, 1).save(folder / "wide.png")
    _gradient(64, 128, 2).save(folder / "tall.jpg", quality=95)
    _gradient(80, 80, 3).save(folder / "square.png")
    # Stored 96 wide x 64 high with EXIF orientation 6 (rotate 90 CW on display): it trains as 64 x 96.
    exif = Image.Exif()
    exif[0x0112] = 6
    _gradient(96, 64, 4).save(folder / "exif.jpg", exif=exif, quality=95)
    rgba = Image.new("RGBA", (72, 72), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 36, 72))  # left half fully transparent
    rgba.save(folder / "rgba.png")
    palette = _gradient(70, 90, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png")
    Image.new("CMYK", (90, 70), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray((np.linspace(0, 65535, 80 * 80).reshape(80, 80)).astype(np.uint16)).save(folder / "grey16.png")
    _gradient(80, 100, 6).convert("L").save(folder / "grey.png")
    _gradient(96, 96, 7).save(folder / "nocap.png")
    buffer = io.BytesIO()
    _gradient(96, 96, 8).save(buffer, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with the wrong name\n")
    shutil.copy(folder / "square.png", folder / "square_copy.png")
    (folder / "layers.psd").write_bytes(b"8BPS not really")
    for name in (*USABLE, *EXPECTED_SKIPS):
        if name not in ("nocap.png", "layers.psd"):
            (folder / name).with_suffix(".txt").write_text(f"photo of {Path(name).stem}, gradient, test")
    long = ", ".join(f"red circle {i}" for i in range(40))
    (folder / LONG_CAPTION_FILE).with_suffix(".txt").write_text(long)
    return folder

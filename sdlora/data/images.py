"""Open any image a person might have and return it as RGB, or say exactly why it can't be used."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Pillow's own bomb guard warns at ~89 Mpx and errors at twice that; a training image over 64 Mpx is almost
# certainly a mistake (or an attack), so it is refused outright.
MAX_PIXELS = 64 * 1024 * 1024


class ImageLoadError(UserError, ValueError):
    """An image file that cannot be used for training; `path` and `reason` say which and why."""

    def __init__(self, path: Path, reason: str, kind: str = "corrupt"):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind  # one of KINDS: what the preflight report groups it under


KINDS = ("empty", "not_an_image", "truncated", "corrupt", "too_large")


def load_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode fully, apply EXIF orientation, and convert to RGB (alpha composited on `background`, not black)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)", "empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise ImageLoadError(
                        path, f"{opened.width}x{opened.height} is over the {MAX_PIXELS} pixel limit", "too_large"
                    )
                opened.load()  # full decode here: a truncated file fails now, not mid-epoch
                image = ImageOps.exif_transpose(opened)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            path, "not an image Pillow can read (wrong extension or corrupt)", "not_an_image"
        ) from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(path, f"decompression bomb guard: {exc}", "too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() or "broken data stream" in str(exc) else "corrupt"
        raise ImageLoadError(path, f"cannot decode: {exc}", kind) from None
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255.0).round().clip(0, 255).astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")

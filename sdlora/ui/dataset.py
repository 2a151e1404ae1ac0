"""The Dataset tab's work: a folder's images with their captions, saving one caption, the preflight report. The
images are found and checked by `sdlora.data`, exactly as a run would find them."""

from __future__ import annotations

from pathlib import Path

from sdlora.config import DataSection
from sdlora.data import discover, preflight
from sdlora.files.atomic import write_text_atomic
from sdlora.ui.paths import OutsideRootError, inside_roots


def images_with_captions(folder: str | Path, roots: list[Path]) -> list[tuple[Path, str]]:
    """(image, caption) for every image a run would train on under `folder`, in the data package's order."""
    real = inside_roots(folder, roots)
    return [(r.path, r.caption) for r in discover(real, verify=False)]


def save_caption(image: str | Path, text: str, roots: list[Path]) -> Path:
    """Write `text` to the image's `.txt` caption atomically (a crash leaves the old caption, never half a new one);
    the image itself is never opened for writing."""
    real = inside_roots(image, roots)
    if not real.is_file():
        raise OutsideRootError(f"{image}: no such image; open the dataset folder again")
    caption = real.with_suffix(".txt")
    inside_roots(caption, roots)  # a caption that is a symlink out of the root is not followed
    write_text_atomic(caption, text.strip() + "\n")
    return caption


def report(folder: str | Path, roots: list[Path], resolution: int = 512) -> tuple[str, list[tuple[str, str, str]]]:
    """The preflight table `sdlora dataset check` prints, and each problem as (file, kind, reason) to highlight."""
    real = inside_roots(folder, roots)
    result = preflight.check(DataSection(path=real, resolution=resolution))
    problems = [(Path(f.path).name, f.kind, f.detail) for f in [*result.skipped, *result.warnings]]
    return preflight.format_table(result), problems

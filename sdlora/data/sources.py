"""Find the training images and their captions in a folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sdlora.data.images import IMAGE_SUFFIXES, ImageLoadError, load_rgb

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    caption_missing: bool = False


def _read_metadata_jsonl(folder: Path) -> dict[Path, str]:
    """Captions from a Hugging Face `metadata.jsonl` (one {"file_name": ..., "text": ...} per line)."""
    captions: dict[Path, str] = {}
    for metadata in sorted(folder.rglob("metadata.jsonl")):
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file_name, text = row["file_name"], row.get("text", "")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(
                    f"{metadata}:{number}: each line must be JSON with 'file_name' and 'text' ({exc})"
                ) from None
            captions[(metadata.parent / file_name).resolve()] = str(text)
    return captions


def discover(
    folder: str | Path, caption_extension: str = ".txt", default_caption: str = "", verify: bool = True
) -> list[ImageRecord]:
    """Every image under `folder` (recursively) with its caption.

    Captions come from a same-name sidecar file, else from `metadata.jsonl`, else `default_caption` (with a
    warning naming the images). With `verify`, each image is decoded once; broken files are skipped with a
    warning that names them, and an error is raised only if nothing usable is left.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"data.path: dataset folder {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"data.path: {folder} is not a folder")
    from_metadata = _read_metadata_jsonl(folder)
    images = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not images:
        raise DatasetError(
            f"data.path: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} in all subfolders)"
        )
    records, broken, uncaptioned = [], [], []
    for path in images:
        if verify:
            try:
                load_rgb(path)
            except ImageLoadError as exc:
                broken.append(exc)
                continue
        sidecar = path.with_suffix(caption_extension)
        if sidecar.is_file():
            caption, missing = sidecar.read_text(encoding="utf-8").strip(), False
        elif path.resolve() in from_metadata:
            caption, missing = from_metadata[path.resolve()].strip(), False
        else:
            caption, missing = default_caption, True
            uncaptioned.append(path)
        records.append(ImageRecord(path=path, caption=caption, caption_missing=missing))
    for exc in broken:
        log.warning("skipping unusable image %s", exc)
    if uncaptioned:
        shown = ", ".join(str(p) for p in uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        log.warning(
            "%d image(s) have no caption (no %s file or metadata.jsonl entry); using data.default_caption=%r: %s",
            len(uncaptioned), caption_extension, default_caption, shown,
        )
    if not records:
        raise DatasetError(
            f"data.path: none of the {len(images)} image(s) in {folder} can be decoded; first error: {broken[0]}"
        )
    return records

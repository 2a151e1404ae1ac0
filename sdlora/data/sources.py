"""Find the training images, their captions and their per-folder settings in one or more source folders.

Captions come from, in order: a sidecar file (`data.caption_extension`, then `.txt` / `.caption`), a
`metadata.jsonl` / `metadata.csv` row (`file_name` + `text`), the file name (`captions.from_filename`), or the
default caption. Settings for an image come from its source in the run config, overridden by a kohya-style
`10_name` folder above it (repeats) and by `dataset.toml` / `dataset.yaml` files in the folders above it (the
nearest folder wins).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdlora.config import (
    CaptionSection,
    ConfigError,
    FolderSettings,
    SourceSection,
    load_folder_settings,
)
from sdlora.data.captions import caption_from_filename
from sdlora.data.images import IMAGE_SUFFIXES, ImageLoadError, load_rgb
from sdlora.data.masks import is_mask_file, mask_file_for
from sdlora.errors import UserError

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FOLDER_SETTINGS_FILES = ("dataset.toml", "dataset.yaml", "dataset.yml")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be trained on; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    caption_missing: bool = False
    caption_status: str = "ok"  # ok | missing | empty | filename
    source: str = ""
    repeats: int = 1
    loss_weight: float = 1.0
    adapter_weight: float = 1.0  # the adapter weight it trains at (`data.sources[*].adapter_weight`)
    captions: CaptionSection = field(default_factory=CaptionSection)
    size: tuple[int, int] | None = None  # (height, width) after EXIF orientation; set by the preflight
    content_hash: str = ""  # sha256 of the file bytes; set by the preflight
    regularization: bool = False  # from a source with `regularization: true` (prior preservation)
    mask: Path | None = None  # its `<stem>-masklabel.png`, when there is one (data/masks.py)


@dataclass
class SourceScan:
    """What one pass over the source folders found, before any image is decoded."""

    records: list[ImageRecord]
    unsupported: list[Path]
    settings_files: list[Path]


def _read_metadata(folder: Path) -> dict[Path, str]:
    """Captions from Hugging Face style `metadata.jsonl` / `metadata.csv` files anywhere under `folder`."""
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
    for metadata in sorted(folder.rglob("metadata.csv")):
        with open(metadata, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise DatasetError(f"{metadata}: needs a header row with 'file_name' and 'text' columns")
            for row in reader:
                captions[(metadata.parent / row["file_name"]).resolve()] = str(row.get("text") or "")
    return captions


def _merge(settings: SourceSection, folder: FolderSettings) -> SourceSection:
    update = {name: getattr(folder, name) for name in folder.model_fields_set if name != "captions"}
    if folder.captions is not None:
        explicit = {name: getattr(folder.captions, name) for name in folder.captions.model_fields_set}
        update["captions"] = settings.captions.model_copy(update=explicit)
    return settings.model_copy(update={k: v for k, v in update.items() if v is not None})


class _FolderResolver:
    """Settings for each folder under a source: the source's, then kohya names and dataset files, outer to inner."""

    def __init__(self, source: SourceSection):
        self.root = Path(source.path)
        self.cache: dict[Path, SourceSection] = {}
        self.settings_files: list[Path] = []
        self.base = source

    def settings(self, folder: Path) -> SourceSection:
        if folder in self.cache:
            return self.cache[folder]
        parent_settings = self.base if folder == self.root or self.root not in folder.parents else None
        settings = parent_settings or self.settings(folder.parent)
        kohya = KOHYA_FOLDER.match(folder.name)
        if kohya and int(kohya.group(1)) > 0:
            settings = settings.model_copy(update={"repeats": int(kohya.group(1))})
        for name in FOLDER_SETTINGS_FILES:
            if (folder / name).is_file():
                try:
                    settings = _merge(settings, load_folder_settings(folder / name))
                except ConfigError as exc:
                    raise DatasetError(str(exc)) from None
                self.settings_files.append(folder / name)
        self.cache[folder] = settings
        return settings


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _caption_for(path: Path, settings: SourceSection, metadata: dict[Path, str]) -> tuple[str, str]:
    for suffix in dict.fromkeys((settings.caption_extension, *CAPTION_SUFFIXES)):
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8").strip()
            return (text, "ok") if text else (settings.default_caption, "empty")
    if path.resolve() in metadata:
        text = metadata[path.resolve()].strip()
        return (text, "ok") if text else (settings.default_caption, "empty")
    if settings.captions.from_filename:
        return caption_from_filename(path), "filename"
    return settings.default_caption, "missing"


def scan_sources(sources: tuple[SourceSection, ...] | list[SourceSection]) -> SourceScan:
    """Every image under each source with its caption and settings; no image is decoded here."""
    records, unsupported, settings_files = [], [], []
    for number, source in enumerate(sources):
        folder = Path(source.path)
        where = "data.path" if len(sources) == 1 else f"data.sources[{number}].path"
        if not folder.exists():
            raise DatasetError(f"{where}: dataset folder {folder} does not exist")
        if not folder.is_dir():
            raise DatasetError(f"{where}: {folder} is not a folder")
        resolver, metadata = _FolderResolver(source), _read_metadata(folder)
        known = {*CAPTION_SUFFIXES, source.caption_extension}
        for path in _visible_files(folder):
            if is_mask_file(path):  # a loss mask, not a training image
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                if path.suffix.lower() not in known and path.name not in (*METADATA_FILES, *FOLDER_SETTINGS_FILES):
                    unsupported.append(path)
                continue
            settings = resolver.settings(path.parent)
            if source.regularization and settings.adapter_weight != 1.0:
                raise DatasetError(
                    f"{where}: {path.parent} sets adapter_weight {settings.adapter_weight:g} in its dataset file, but "
                    "regularization images are trained at weight 1.0; drop adapter_weight there"
                )
            caption, status = _caption_for(path, settings, metadata)
            records.append(ImageRecord(
                path=path, caption=caption, caption_missing=status == "missing", caption_status=status,
                source=str(folder), repeats=settings.repeats, loss_weight=settings.loss_weight,
                adapter_weight=settings.adapter_weight, captions=settings.captions,
                regularization=source.regularization, mask=mask_file_for(path),
            ))
        settings_files += resolver.settings_files
    return SourceScan(records, unsupported, settings_files)


def discover(
    folder: str | Path, caption_extension: str = ".txt", default_caption: str = "", verify: bool = True
) -> list[ImageRecord]:
    """Every image under `folder` (recursively) with its caption; the one-folder form of `scan_sources`.

    With `verify`, each image is decoded once; broken files are skipped with a warning that names them, and an
    error is raised only if nothing usable is left. (`preflight.check` does this and much more for a run.)
    """
    source = SourceSection(path=Path(folder), caption_extension=caption_extension, default_caption=default_caption)
    found = scan_sources([source]).records
    if not found:
        raise DatasetError(
            f"data.path: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} in all subfolders)"
        )
    records, broken = [], []
    for record in found:
        if verify:
            try:
                image = load_rgb(record.path)
            except ImageLoadError as exc:
                broken.append(exc)
                continue
            record = replace(record, size=(image.height, image.width))
        records.append(record)
    for exc in broken:
        log.warning("skipping unusable image %s", exc)
    uncaptioned = [r.path for r in records if r.caption_missing]
    if uncaptioned:
        shown = ", ".join(str(p) for p in uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        log.warning(
            "%d image(s) have no caption (no %s file or metadata.jsonl entry); using data.default_caption=%r: %s",
            len(uncaptioned), caption_extension, default_caption, shown,
        )
    if not records:
        raise DatasetError(
            f"data.path: none of the {len(found)} image(s) in {folder} can be decoded; first error: {broken[0]}"
        )
    return records

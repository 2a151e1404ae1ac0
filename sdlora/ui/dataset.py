"""The Dataset tab's work: a folder's (or a run config's) images with their captions, saving one caption, the
preflight report with each problem file. The images are found and checked by `sdlora.data`, exactly as a run would
find them; a config is read by `sdlora.config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.config import DataSection, load_config
from sdlora.data import preflight, scan_sources
from sdlora.files.atomic import write_text_atomic
from sdlora.ui.paths import OutsideRootError, inside_roots

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")
FOLDER_SETTINGS = ("dataset.toml", "dataset.yaml", "dataset.yml")  # a folder's own settings: open the folder


@dataclass(frozen=True)
class Thumbnail:
    image: Path
    caption: str
    problem: str = ""  # "kind: detail" from the preflight report, when the image has one

    @property
    def label(self) -> str:
        """The gallery caption: a problem image's reason first, marked, so it stands out among the thumbnails."""
        return f"⚠ {self.problem} | {self.caption}" if self.problem else self.caption


def data_section(path: str | Path, roots: list[Path], resolution: int = 512) -> DataSection:
    """What `path` names, as a run's `data:` section: a folder (at `resolution`), or a run config (YAML/TOML) whose
    `data:` section is used as it is. Every image folder a config names must lie inside the roots; a relative one is
    taken from the first root, as the page's own paths are."""
    real = inside_roots(path, roots)
    if real.is_file() and real.name in FOLDER_SETTINGS:
        real = real.parent
    if not real.is_file():
        return DataSection(path=real, resolution=resolution)
    if real.suffix not in CONFIG_SUFFIXES:
        raise OutsideRootError(f"{path}: open a folder of images or a run config ({', '.join(CONFIG_SUFFIXES)})")
    data = load_config(real).data
    if data.sources:
        sources = tuple(s.model_copy(update={"path": inside_roots(s.path, roots)}) for s in data.sources)
        return data.model_copy(update={"sources": sources})
    return data.model_copy(update={"path": inside_roots(data.path, roots)})


def thumbnails(path: str | Path, roots: list[Path], resolution: int = 512) -> tuple[list[Thumbnail], str,
                                                                                       list[tuple[str, str, str]]]:
    """Every image a run would train on (in the data package's order), each marked with its preflight problem; the
    report `sdlora dataset check` prints; and every problem file as (file, kind, detail), the unusable ones too."""
    data = data_section(path, roots, resolution)
    result = preflight.check(data)
    findings = [*result.skipped, *result.warnings]
    problems: dict[str, str] = {}
    for finding in findings:
        problems[finding.path] = "; ".join(filter(None, [problems.get(finding.path), f"{finding.kind}: "
                                                         f"{finding.detail}"]))
    records = scan_sources(data.resolved_sources()).records
    shown = [Thumbnail(r.path, r.caption, problems.get(str(r.path), "")) for r in records]
    table = [(Path(f.path).name, f.kind, f.detail) for f in findings]
    return shown, preflight.format_table(result), table


def read_caption(image: str | Path, roots: list[Path]) -> str:
    """The text of the image's `.txt` caption (empty when it has none), for editing."""
    caption = inside_roots(image, roots).with_suffix(".txt")
    return inside_roots(caption, roots).read_text(encoding="utf-8").strip() if caption.is_file() else ""


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

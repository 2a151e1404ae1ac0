"""The page: four tabs (Dataset, Train, Generate, Share), each laid out and wired in `tabs/`; their work is one call
into `dataset.py`, `form.py`, `runs.py`, `generate.py` or `sdlora.hub`. Only layout and wiring here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from sdlora.ui import form, runs

# Given to launch() (gradio 6 takes a page's CSS there).
CSS = """
#samples img { image-rendering: pixelated; }  /* 64-px samples of a tiny base: sharp pixels, not a blur */
"""


@dataclass
class Settings:
    roots: list[Path]
    runs_root: Path
    images: Path  # where Generate saves its PNGs
    cpus: int | None = None
    schema: list[form.Field] = field(default_factory=form.fields)

    @property
    def readable(self) -> list[Path]:
        return [*self.roots, self.runs_root, self.images]


def problem(exc: Exception) -> str:
    return "error: " + str(exc).replace("\n", "\n\nerror: ")


def run_choices(settings: Settings) -> list[tuple[str, str]]:
    return [(r.label, str(r.folder)) for r in runs.list_runs(settings.runs_root)]


def build(settings: Settings) -> gr.Blocks:
    from sdlora.ui.tabs import dataset, generate, share, train

    with gr.Blocks(title="sdlora") as page:
        gr.Markdown("# sdlora")
        with gr.Tab("Dataset", id="dataset"):
            dataset.build(settings)
        with gr.Tab("Train", id="train"):
            train.build(settings)
        with gr.Tab("Generate", id="generate"):
            generate.build(settings)
        with gr.Tab("Share", id="share"):
            share.build(settings)
    return page

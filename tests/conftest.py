"""Shared fixtures: a tiny SD1.5-shaped base and small datasets, built once per session. Nothing is downloaded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in bases are built into a per-session folder, never into the user's ~/.cache."""
    os.environ["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("sdlora-cache"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from sdlora.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-base") / "pipe", seed=0)


def write_shapes_dataset(folder: Path, count: int, style: str = "striped", seed: int = 0, size: int = 64) -> Path:
    from sdlora.bench.shapes import random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = random_scene(rng, style=style)
        render(scene, size).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(scene.caption, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def style_dataset(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "style", 8)


@pytest.fixture
def make_config(tiny_base, style_dataset, tmp_path):
    """A validated RunConfig on the tiny base and style set; keyword overrides as 'section.field' strings."""
    from sdlora.config import load_config

    def make(*overrides: str, **sections):
        defaults = [
            f"model.base={tiny_base}",
            f"data.path={style_dataset}",
            "data.resolution=64",
            "train.steps=4",
            "train.batch_size=2",
            "train.learning_rate=1e-3",
            f"output.dir={tmp_path / 'run'}",
        ]
        return load_config(None, [*defaults, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    """A saved tiny SDXL-shaped pipeline: two text encoders, time-id conditioned UNet."""
    from sdlora.models.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2v_base(tmp_path_factory) -> Path:
    """A saved tiny SD2.1-768-v-shaped pipeline: v-prediction, OpenCLIP-like text encoder."""
    from sdlora.models.tiny import save_tiny_sd2v_pipeline

    return save_tiny_sd2v_pipeline(tmp_path_factory.mktemp("tiny-sd2v") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_base() -> Path:
    """The built-in `sdlora:tiny-sd3` (SD3 transformer, 16-channel VAE, two CLIPs with projection, T5), built
    once per session into the session's cache, so in-process runs and CLI subprocesses share it."""
    from sdlora.models import resolve_builtin

    return resolve_builtin("sdlora:tiny-sd3")

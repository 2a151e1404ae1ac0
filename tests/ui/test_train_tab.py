"""The Train tab's sample gallery: the newest few sample grids, newest first, so a long run's samples neither push
the form off the page nor hide the latest one."""

from __future__ import annotations

from PIL import Image

from tests.ui.conftest import need_gradio


def test_the_gallery_shows_the_newest_samples_first_and_only_a_few(tmp_path):
    need_gradio()
    from sdlora.ui.app import Settings
    from sdlora.ui.tabs.train import SHOWN_SAMPLES, watch

    folder = tmp_path / "runs" / "long-run"
    (folder / "samples").mkdir(parents=True)
    steps = [50 * n for n in range(1, SHOWN_SAMPLES + 3)]
    for step in steps:
        Image.new("RGB", (8, 8), "white").save(folder / "samples" / f"step-{step:06d}.png")
    settings = Settings(roots=[tmp_path], runs_root=tmp_path / "runs", images=tmp_path / "images")

    _, _, _, gallery, _ = watch(settings, str(folder))

    shown = [path for path, _label in gallery]
    newest = [str(folder / "samples" / f"step-{step:06d}.png") for step in reversed(steps)][:SHOWN_SAMPLES]
    assert shown == newest

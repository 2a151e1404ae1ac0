"""`sdlora class-images`: prior-preservation images made by the base itself, captioned with the class prompt,
deterministic by seed and index, and resumable (images already there are kept, not remade)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.data import preflight

PROMPT = "a photo of a red circle"


def _cli(capsys, tiny_base, out, count, *extra):
    code = main(["class-images", "--base", str(tiny_base), "--prompt", PROMPT, "--count", str(count), "--out",
                 str(out), "--steps", "2", "--seed", "7", *extra])
    return code, capsys.readouterr()


def _pixels(path):
    return np.asarray(Image.open(path))


def test_class_images_are_captioned_deterministic_and_resumable(capsys, tiny_base, style_dataset, tmp_path,
                                                                monkeypatch):
    from sdlora import inference

    code, out = _cli(capsys, tiny_base, tmp_path / "whole", 3)
    assert code == 0 and "3 made, 0 already there" in out.out
    whole = sorted((tmp_path / "whole").iterdir())
    assert [p.name for p in whole] == ["00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt"]
    assert all(p.read_text() == PROMPT + "\n" for p in whole if p.suffix == ".txt")
    images = [_pixels(p) for p in whole if p.suffix == ".png"]
    assert not np.array_equal(images[0], images[1])  # one seed per index

    # Image i is `sdlora generate --seed 7+i` of the class prompt: the same pipeline code, the same pixels.
    assert main(["generate", "--base", str(tiny_base), "--prompt", PROMPT, "--steps", "2", "--seed", "8",
                 "-o", str(tmp_path / "generated.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "generated.png"), images[1])

    # Made in two calls (the first stopped after one image), the folder is the one made in a single call; the
    # second call makes only the missing images and never loads the base when nothing is missing.
    assert _cli(capsys, tiny_base, tmp_path / "parts", 1)[0] == 0
    first = (tmp_path / "parts" / "00000.png").stat().st_mtime_ns
    made = []
    real = inference.generate

    def counting(pipe, prompt, **kwargs):
        made.append(kwargs["seed"])
        return real(pipe, prompt, **kwargs)

    monkeypatch.setattr("sdlora.inference.class_images.generate", counting)
    code, out = _cli(capsys, tiny_base, tmp_path / "parts", 3)
    assert code == 0 and made == [8, 9] and "2 made, 1 already there" in out.out
    assert (tmp_path / "parts" / "00000.png").stat().st_mtime_ns == first
    parts = sorted((tmp_path / "parts").iterdir())
    assert [p.name for p in parts] == [p.name for p in whole]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(parts, whole))

    monkeypatch.setattr("sdlora.cli._generation_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    code, out = _cli(capsys, tiny_base, tmp_path / "parts", 3)
    assert code == 0 and made == [8, 9] and "0 made, 3 already there" in out.out

    # The folder is a regularization source as it stands: every image found, captioned with the class prompt.
    config = load_config(None, [f"model.base={tiny_base}", "data.resolution=64", "data.sources=[{path: "
                                f"{style_dataset}}}, {{path: {tmp_path / 'whole'}, regularization: true}}]"])
    regularization = [r for r in preflight.check(config.data).records if r.regularization]
    assert sorted(r.path.name for r in regularization) == ["00000.png", "00001.png", "00002.png"]
    assert {r.caption for r in regularization} == {PROMPT}


def test_a_folder_of_another_class_is_refused(capsys, tiny_base, tmp_path):
    folder = tmp_path / "dogs"
    folder.mkdir()
    (folder / "00000.txt").write_text("a photo of a dog\n")
    code, out = _cli(capsys, tiny_base, folder, 2)
    assert code == 2 and "00000.txt holds another class prompt ('a photo of a dog'" in out.err
    assert sorted(p.name for p in folder.iterdir()) == ["00000.txt"]  # nothing written

"""Grid and sample labels read well: adapters by name, labels that never overlap (issue 18, item 8)."""

from __future__ import annotations

import numpy as np
from adapter_factory import make_adapter
from PIL import Image, ImageDraw, ImageFont

from sdlora import cli, formats
from sdlora.inference import AdapterSpec, grid
from sdlora.models import load_base_model

DEMO_PROMPTS = ["a red circle on a blue background, striped style", "a yellow square on a black background"]


def _boxes(layout, font):
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return [draw.textbbox(corner, text, font=font) for corner, text in layout.labels]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_the_two_prompt_labels_of_a_sample_image_do_not_overlap():
    """A training run's sample grid: one 64 px column per prompt, each labelled with its prompt."""
    font = ImageFont.load_default()
    cells = [Image.new("RGB", (64, 64), "white")] * 2
    layout = grid.grid_layout(2, 2, (64, 64), font, column_labels=DEMO_PROMPTS)
    boxes = _boxes(layout, font)
    assert len(boxes) > 2  # the prompts wrapped
    for i, a in enumerate(boxes):
        assert not any(_overlap(a, b) for b in boxes[i + 1:]), layout.labels
        assert a[3] <= layout.cells[0][1]  # above the cells
    for (corner, _), box in zip(layout.labels, boxes):
        column = (corner[0] - layout.cells[0][0]) // 64
        assert layout.cells[column][0] <= box[0] and box[2] <= layout.cells[column][0] + 64  # inside its column

    # Rendered: every inked pixel lies in a label box, so what was laid out is what was drawn.
    rendered = np.asarray(grid.image_grid(cells, columns=2, column_labels=DEMO_PROMPTS).convert("L"))
    ink = rendered < 128
    for box in boxes:
        ink[box[1]:box[3], box[0]:box[2]] = False
    assert not ink.any()


def test_long_words_and_row_labels_stay_in_their_place():
    font = ImageFont.load_default()
    layout = grid.grid_layout(4, 2, (64, 64), font, row_labels=["my_dots 0", "my_dots 1"],
                              column_labels=["supercalifragilisticexpialidocious", "x" * 80])
    boxes = _boxes(layout, font)
    assert all(not _overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert len([corner for corner, _ in layout.labels if corner[0] == layout.cells[1][0] + 2]) == grid.LABEL_LINES


def test_grid_labels_name_the_adapter_by_its_file(tiny_base, tmp_path, monkeypatch):
    """`sdlora grid --x weight:0`: columns read `my_dots 0.25`, not `#0 0.25`."""
    dots = formats.save_diffusers(tmp_path / "my_dots.safetensors",
                                  make_adapter(load_base_model(str(tiny_base)).unet, rank=2))
    drawn = {}
    real = grid.image_grid
    monkeypatch.setattr(grid, "image_grid", lambda images, **labels: drawn.update(labels) or real(images, **labels))
    assert cli.main(["grid", "--base", str(tiny_base), "--lora", str(dots), "--prompt", "x", "--steps", "1",
                     "--height", "64", "--width", "64", "--x-values", "0.25,1", "--y", "seed", "--y-values", "1,2",
                     "-o", str(tmp_path / "grid.png")]) == 0
    assert drawn["column_labels"] == ["my_dots 0.25", "my_dots 1"] and drawn["row_labels"] == ["1", "2"]
    assert AdapterSpec.parse("alice/dots:v2.safetensors:0.5").name == "v2" and AdapterSpec("alice/dots").name == "dots"

"""Finding images and captions, and the clear errors for folders that cannot be trained on."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from sdlora.data import (
    CaptionedImageDataset,
    DatasetError,
    ResumableBatchSampler,
    discover,
)


def _image(path, size=(40, 30), color=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_sidecar_captions_recursive_and_formats(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red thing \n")
    _image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("nested")
    _image(tmp_path / "sub" / "c.webp")
    (tmp_path / "sub" / "c.txt").write_text("webp")
    records = discover(tmp_path)
    assert [(r.path.name, r.caption) for r in records] == [("a.png", "a red thing"), ("b.jpg", "nested"), ("c.webp", "webp")]


def test_metadata_jsonl_captions(tmp_path):
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.png")
    rows = [{"file_name": "x.png", "text": "ex"}, {"file_name": "y.png", "text": "why"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert {r.path.name: r.caption for r in discover(tmp_path)} == {"x.png": "ex", "y.png": "why"}


def test_bad_metadata_line_names_file_and_line(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"text": "no file"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: .*file_name"):
        discover(tmp_path)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="data.path: dataset folder .*nope does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="data.path: no images in"):
        discover(tmp_path)


def test_corrupt_image_is_skipped_with_its_name(tmp_path, caplog):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    truncated = _image(tmp_path / "cut.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    with caplog.at_level(logging.WARNING):
        records = discover(tmp_path)
    assert [r.path.name for r in records] == ["good.png"]
    assert "broken.png" in caplog.text and "cut.jpg" in caplog.text


def test_only_corrupt_images_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"junk")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 2 image"):
        discover(tmp_path)


def test_missing_caption_uses_default_and_says_so(tmp_path, caplog):
    _image(tmp_path / "lonely.png")
    with caplog.at_level(logging.WARNING):
        records = discover(tmp_path, default_caption="a photo")
    assert records[0].caption == "a photo" and records[0].caption_missing
    assert "lonely.png" in caplog.text and "default_caption" in caplog.text


def test_dataset_item_shapes_and_determinism(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", size=(80, 40), color=(i * 80, 0, 0))
    dataset = CaptionedImageDataset(discover(tmp_path), resolution=32, crop="random", random_flip=True, seed=5)
    item = dataset[(2, 1)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["original_size"] == (40, 80)
    assert torch.equal(item["pixel_values"], dataset[(2, 1)]["pixel_values"])


def test_sampler_is_a_function_of_seed_and_position():
    sampler = ResumableBatchSampler(10, batch_size=3, seed=1)
    stream = iter(sampler)
    first_seven = [next(stream) for _ in range(7)]
    resumed = ResumableBatchSampler(10, batch_size=3, seed=1, start=4)
    assert [next(iter(resumed))] == first_seven[4:5]
    epoch0 = [i for batch in first_seven[:3] for _, i in batch]
    assert len(set(epoch0)) == 9  # one epoch has no repeats; the 10th image waits for the next epoch
    assert first_seven[3][0][0] == 1  # the fourth batch starts epoch 1


def test_sampler_refuses_a_batch_larger_than_the_dataset():
    with pytest.raises(ValueError, match="train.batch_size"):
        ResumableBatchSampler(2, batch_size=4, seed=0)

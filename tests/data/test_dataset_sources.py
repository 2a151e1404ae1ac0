"""Several sources, caption files and options, kohya repeat folders, per-folder settings, loss weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from sdlora.config import CaptionSection, load_config
from sdlora.data import CaptionedImageDataset, DatasetError, collate
from sdlora.data.captions import build_caption, caption_from_filename
from sdlora.data.preflight import check


def _image(path: Path, size=(40, 40), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_prefix_suffix_keep_tokens_and_shuffle():
    options = CaptionSection(prefix="sks style", suffix="masterpiece", shuffle_tags=True, keep_tokens=1)
    raw = "portrait, red, blue, green, yellow"
    results = {build_caption(raw, options, random.Random(seed)) for seed in range(20)}
    assert len(results) > 3
    for text in results:
        tags = [t.strip() for t in text.split(",")]
        assert tags[:2] == ["sks style", "portrait"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["blue", "green", "red", "yellow"]
    assert build_caption(raw, options, random.Random(5)) == build_caption(raw, options, random.Random(5))


def test_caption_and_tag_dropout():
    assert build_caption("a, b", CaptionSection(prefix="sks", dropout=1.0), random.Random(0)) == ""
    kept = [build_caption("k, a, b, c, d", CaptionSection(tag_dropout=0.5, keep_tokens=1), random.Random(s))
            for s in range(50)]
    assert all(text.startswith("k") for text in kept)
    lengths = {len(text.split(", ")) for text in kept}
    assert min(lengths) < 5 and max(lengths) > 2


def test_caption_from_filename():
    assert caption_from_filename(Path("red_circle-on_blue (2).png")) == "red circle on blue"
    assert caption_from_filename(Path("my_cat_003.jpg")) == "my cat"


def test_sources_repeats_kohya_folders_and_folder_settings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _image(a / "10_cats" / "c1.png")
    (a / "10_cats" / "c1.caption").write_text("cat, sitting")
    _image(a / "10_cats" / "c2.png", color=(0, 200, 0))
    (a / "10_cats" / "c2.txt").write_text("cat, lying")
    _image(a / "plain" / "p1.png", color=(0, 0, 200))
    (a / "plain" / "dataset.toml").write_text('repeats = 3\nloss_weight = 0.5\n[captions]\nprefix = "zzz"\n')
    _image(b / "x.png", color=(9, 9, 9))
    _image(b / "y_dog.png", color=(90, 9, 9))
    (b / "metadata.csv").write_text("file_name,text\nx.png,from csv\n")
    config = load_config(None, [
        "data.resolution=32",
        f'data.sources=[{{path: "{a}"}}, {{path: "{b}", loss_weight: 2.0, repeats: 2, '
        '"captions": {from_filename: true, suffix: "sfx"}}]',
    ])
    report = check(config.data)
    by_name = {r.path.name: r for r in report.records}
    assert {n: (r.repeats, r.loss_weight) for n, r in by_name.items()} == {
        "c1.png": (10, 1.0), "c2.png": (10, 1.0), "p1.png": (3, 0.5), "x.png": (2, 2.0), "y_dog.png": (2, 2.0),
    }
    assert by_name["c1.png"].caption == "cat, sitting" and by_name["x.png"].caption == "from csv"
    assert by_name["y_dog.png"].caption == "y dog" and by_name["y_dog.png"].caption_status == "filename"
    assert report.items_per_epoch == 10 + 10 + 3 + 2 + 2
    dataset = CaptionedImageDataset(report.records, 32, seed=0)
    assert len(dataset) == 27
    captions = {dataset[(0, i)]["caption"] for i in range(len(dataset))}
    assert captions == {"cat, sitting", "cat, lying", "zzz", "from csv, sfx", "y dog, sfx"}
    batch = collate([dataset[(0, 0)], dataset[(0, 20)], dataset[(0, 25)]])
    assert batch["loss_weights"].tolist() == [1.0, 0.5, 2.0]


def test_bad_folder_settings_name_the_file(tmp_path):
    _image(tmp_path / "i.png")
    (tmp_path / "dataset.yaml").write_text("repeets: 2\n")
    config = load_config(None, [f"data.path={tmp_path}"])
    with pytest.raises(DatasetError, match=r"dataset.yaml: unknown key 'repeets'"):
        check(config.data)

"""Acceptance 1: a messy corpus is reported file by file, and training uses exactly its good images."""

from __future__ import annotations

import json

import pytest
from corpus import BACKGROUND, EXPECTED_SKIPS, LONG_CAPTION_FILE, USABLE, make_corpus

from sdlora.config import load_config
from sdlora.data import DatasetError, load_rgb
from sdlora.data.images import ImageLoadError
from sdlora.data.preflight import check, format_table


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "messy")


def _config(folder, *overrides):
    return load_config(None, [f"data.path={folder}", "data.resolution=64", *overrides])


def test_check_sorts_every_file(corpus):
    report = check(_config(corpus).data, batch_size=2)
    assert sorted(r.path.name for r in report.records) == sorted(USABLE)
    assert {f.path.split("/")[-1]: f.kind for f in report.skipped} == EXPECTED_SKIPS
    warned = {(f.path.split("/")[-1], f.kind) for f in report.warnings}
    assert ("nocap.png", "caption_missing") in warned
    assert (LONG_CAPTION_FILE, "caption_long") in warned
    sizes = {r.path.name: r.size for r in report.records}
    assert sizes["exif.jpg"] == (96, 64)  # EXIF rotation applied: stored 96x64 (w x h), trains 64 wide x 96 high
    tags = report.tag_frequency[str(corpus)]
    assert tags["gradient"] == len(USABLE) - 2  # nocap has no caption, grey has the long one
    assert report.items_per_epoch == len(USABLE) and report.batches_per_epoch == len(USABLE) // 2


def test_small_images_are_warned_about(corpus):
    report = check(_config(corpus, "data.resolution=96").data)
    small = {f.path.split("/")[-1] for f in report.warnings if f.kind == "small"}
    assert small == set(USABLE) - {"nocap.png"}  # the only one with both sides >= 96


def test_images_convert_properly(corpus):
    rgba = load_rgb(corpus / "rgba.png", BACKGROUND)
    assert rgba.getpixel((5, 5)) == BACKGROUND and rgba.getpixel((60, 5)) == (255, 0, 0)
    cmyk = load_rgb(corpus / "cmyk.jpg")
    red, green, blue = cmyk.getpixel((10, 10))
    assert red > 240 and green < 15 and blue < 15
    grey16 = load_rgb(corpus / "grey16.png")
    assert grey16.mode == "RGB" and grey16.getpixel((79, 79))[0] == 255 and grey16.getpixel((0, 0))[0] == 0
    assert 100 < grey16.getpixel((40, 40))[0] < 155  # scaled from 16 bits, not clipped to white
    assert load_rgb(corpus / "palette.png").mode == "RGB"
    assert load_rgb(corpus / "exif.jpg").size == (64, 96)
    for name, kind in (("cut.jpg", "truncated"), ("empty.png", "empty"), ("notes.png", "not_an_image")):
        with pytest.raises(ImageLoadError, match=name) as caught:
            load_rgb(corpus / name)
        assert caught.value.kind == kind


def test_cli_table_and_json(corpus, capsys):
    from sdlora.cli import main

    capsys.readouterr()
    assert main(["dataset", "check", str(corpus), "data.resolution=64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images_usable"] == len(USABLE) and report["images_found"] == len(USABLE) + 4
    assert {s["path"].split("/")[-1]: s["kind"] for s in report["skipped"]} == EXPECTED_SKIPS
    assert report["buckets"] == {"64x64": len(USABLE)}
    # issue 17: the .psd was counted as skipped but not as found; every file is now in both totals
    assert report["files_found"] == report["images_usable"] + len(report["skipped"]) == len(USABLE) + 5
    table = format_table(check(_config(corpus).data))
    assert f"files found {len(USABLE) + 5} ({len(USABLE) + 4} image(s), 1 other), usable {len(USABLE)}, skipped 5" \
        in table
    for name, kind in EXPECTED_SKIPS.items():
        assert any(name in line and kind in line for line in table.splitlines()), (name, table)
    assert "Epoch: 10 items with repeats -> 10 batches -> 10 optimizer steps" in table


def test_table_names_the_problem_kinds(corpus):
    text = format_table(check(_config(corpus, "data.bucketing.enabled=true", "data.bucketing.step=16").data))
    assert "bucketing on" in text and "Buckets" in text and "caption_missing" in text


def test_training_uses_exactly_the_good_images(corpus, tiny_base, tmp_path, monkeypatch):
    from sdlora.data.dataset import CaptionedImageDataset
    from sdlora.training.run import TrainingRun

    loaded = []
    original = CaptionedImageDataset._load

    def spy(self, index):
        image, index = original(self, index)
        loaded.append(self.records[index].path.name)
        return image, index

    monkeypatch.setattr(CaptionedImageDataset, "_load", spy)
    config = _config(corpus, f"model.base={tiny_base}", "train.steps=3", "train.batch_size=2",
                     "data.bucketing.enabled=true", "data.bucketing.step=16", f"data.background={list(BACKGROUND)}",
                     f"output.dir={tmp_path / 'run'}")
    run = TrainingRun(config)
    run.build()
    assert sorted(r.path.name for r in run.dataset.records) == sorted(USABLE)
    result = run.fit()
    assert result.final_step == 3 and all(loss == loss for loss in result.losses)
    assert set(loaded) <= set(USABLE) and len(loaded) == 6
    assert result.adapter_path.is_file()


def test_nothing_usable_stops_before_models_load(tmp_path):
    from sdlora.training.run import TrainingRun

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("text")
    config = _config(folder, "model.base=/no/such/model", f"output.dir={tmp_path / 'run'}")
    run = TrainingRun(config)
    with pytest.raises(DatasetError, match="none of the 2 image.*can be used"):
        run.build()
    assert run.base is None


def test_a_resolution_no_machine_can_hold_is_one_line(corpus, capsys, monkeypatch):
    """Issue 17: data.resolution=1000000000 passed validation and died in a MemoryError."""
    from sdlora.cli import main
    from sdlora.data import preflight

    assert main(["dataset", "check", str(corpus), "data.resolution=1000000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "data.resolution: Value error, must be at most 4096 pixels per side, got 1000000000" in err

    # Within the bound, the preflight counts what a batch holds in RAM and refuses what cannot fit, by the fields.
    report = check(_config(corpus, "data.resolution=4096").data, batch_size=64)
    assert report.batch_memory >= 64 * 4096 * 4096 * 15
    monkeypatch.setattr(preflight, "available_ram", lambda: 8 * 2**30)
    assert "more than the 8.0 GiB available: training will refuse it" in format_table(report)
    with pytest.raises(DatasetError, match=r"data.resolution 4096 with train.batch_size 64: the data alone needs at "
                       r"least 15\.\d GiB of RAM \(1 batch\(es\) of 64 image\(s\).*8\.0 GiB is available"):
        preflight.require_usable(report, batch_size=64)
    small = check(_config(corpus, "data.resolution=64").data, batch_size=2)
    preflight.require_usable(small, batch_size=2)  # a normal run is not refused

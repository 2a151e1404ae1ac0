"""Samples while training: grids at the requested steps, optional stacked adapters, and no effect on the result."""

from __future__ import annotations

import numpy as np
import torch
from adapter_factory import make_adapter
from PIL import Image

from sdlora import formats
from sdlora.models import load_base_model
from sdlora.training.artifacts import sample_sheet
from sdlora.training.run import train


def _train(make_config, out, *overrides):
    result = train(make_config(f"output.dir={out}", "lora.train_text_encoder=true", "lora.dropout=0.1", *overrides))
    return result, formats.read_adapter(result.adapter_path)


def test_previews_on_or_off_give_the_same_adapter(make_config, tiny_base, tmp_path):
    base = load_base_model(str(tiny_base))
    other = formats.save_diffusers(tmp_path / "subject.safetensors", make_adapter(base.unet, base.text_encoder))
    previews = ["sample.prompts=[a red circle, a blue square]", "sample.every=1", "sample.steps=2", "train.steps=2"]

    plain, plain_adapter = _train(make_config, tmp_path / "off", "train.steps=2")
    shown, shown_adapter = _train(make_config, tmp_path / "on", *previews)
    stacked, stacked_adapter = _train(make_config, tmp_path / "stacked", *previews,
                                      f"sample.adapters=['{other}:0.8']")

    for adapter in (shown_adapter, stacked_adapter):
        for component in ("unet", "text_encoder"):
            for key, tensor in plain_adapter.tensors[component].items():
                assert torch.equal(adapter.tensors[component][key], tensor), key
    assert plain.losses == shown.losses == stacked.losses
    assert not (tmp_path / "off" / "samples").exists()
    for run in ("on", "stacked"):
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]
    grid = Image.open(tmp_path / "on" / "samples" / "step-000001.png")
    assert grid.size[0] == 2 * 192 and grid.size[1] >= 192  # 64 px samples, enlarged 3x (test below)
    # the stacked adapter shows in the previews, and only there
    with_other = np.asarray(Image.open(tmp_path / "stacked" / "samples" / "step-000001.png"), np.int16)
    assert np.abs(with_other - np.asarray(grid, np.int16)).max() > 20
    assert formats.read_adapter(stacked.adapter_path).components == ["unet", "text_encoder"]


def test_kohya_export_and_provenance(make_config, tmp_path):
    result, adapter = _train(make_config, tmp_path / "k", "output.kohya=true", "output.name=style",
                             "output.trigger_words=[sks]", "output.recommended_weight=0.7",
                             "train.steps=1")
    kohya = formats.read_adapter(tmp_path / "k" / "style_kohya.safetensors")
    assert kohya.format == "kohya"
    for component in ("unet", "text_encoder"):
        for key, tensor in adapter.tensors[component].items():
            assert torch.equal(kohya.tensors[component][key], tensor), key
    meta = kohya.metadata
    assert meta["ss_output_name"] == "style" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["sdlora.recommended_weight"] == "0.7" and len(meta["sdlora.dataset_hash"]) == 64
    assert len(meta["sdlora.base_model_hash"]) == 64
    assert adapter.metadata["sdlora.dataset_hash"] == meta["sdlora.dataset_hash"]
    assert '"striped style": 8' in meta["ss_tag_frequency"]
    assert meta["ss_max_train_steps"] == "1"


def test_small_samples_are_enlarged_whole_pixels_and_their_prompts_fit():
    rng = np.random.default_rng(0)
    small = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["a red circle on a blue background, striped style", "a yellow square on a green background"]
    sheet = np.asarray(sample_sheet(small, prompts))
    assert sheet.shape[1] == 2 * 192
    # each cell is its picture with every pixel a 3x3 block, under the labels (the sheet's last 192 rows)
    for column, picture in enumerate(small):
        cell = sheet[-192:, column * 192:(column + 1) * 192]
        assert np.array_equal(cell, np.asarray(picture).repeat(3, axis=0).repeat(3, axis=1))
    labels = sheet[:-192]
    assert labels.shape[0] < 40  # two lines of the default font at most: nothing cut to "..."
    large = [Image.new("RGB", (256, 256), "red")] * 2
    assert sample_sheet(large, prompts).size[0] == 2 * 256  # a real model's samples are pasted as they are

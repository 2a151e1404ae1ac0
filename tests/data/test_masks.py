"""Loss masks follow their image through crops, buckets and flips, and come back the same from the latent cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from masked_images import write_masked_images
from PIL import Image

from sdlora.config import SourceSection
from sdlora.data import CaptionedImageDataset
from sdlora.data.buckets import assign_bucket, make_buckets
from sdlora.data.cache import attach_caches
from sdlora.data.sources import scan_sources


def _dataset(folder: Path, **options) -> CaptionedImageDataset:
    records = scan_sources([SourceSection(path=folder)]).records
    records = [replace(r, size=Image.open(r.path).size[::-1], content_hash=r.path.name) for r in records]
    buckets = make_buckets(64, 8, 32, 128, 4.0)
    targets = [assign_bucket(r.size, buckets, 8, upscale=True) for r in records]
    return CaptionedImageDataset(records, 64, crop="center", random_flip=True, seed=1, buckets=targets,
                                 masked=True, **options)


def test_mask_files_are_masks_not_training_images(tmp_path):
    folder = write_masked_images(tmp_path / "data")
    records = scan_sources([SourceSection(path=folder)]).records
    assert sorted(r.path.name for r in records) == ["cutout.png", "square.png", "tall.png", "unmasked.png", "wide.png"]
    assert {r.path.name: r.mask.name if r.mask else None for r in records}["wide.png"] == "wide-masklabel.png"


def test_the_mask_follows_the_image_through_buckets_crops_and_flips(tmp_path):
    dataset = _dataset(write_masked_images(tmp_path / "data"), mask_from_alpha=True)
    flipped = set()
    for epoch in range(4):
        for item in range(len(dataset)):
            out = dataset[(epoch, item)]
            name = dataset.records[dataset.record_index(epoch, item)].path.stem
            pixels, mask = out["pixel_values"], out["mask"][0]
            assert mask.shape == pixels.shape[1:]  # the bucket's size, not the resolution's square
            if name == "unmasked":
                assert torch.equal(mask, torch.ones_like(mask))  # no mask: trains as before
                continue
            red = pixels[2] < 0  # pure red: no blue (the blue half, and a cutout's white background, have it)
            edge = (mask > 0.02) & (mask < 0.98)  # resampling blends a pixel or two at the border
            assert torch.equal((mask >= 0.98)[~edge], red[~edge]), (name, epoch)
            assert (mask[~edge] <= 0.02).sum() > 0 and (mask[~edge] >= 0.98).sum() > 0
            left_is_red = bool(red[:, 0].all())
            flipped.add(not left_is_red)
    assert flipped == {True, False}  # both orientations were seen


def test_cached_masks_equal_the_live_ones(tmp_path):
    folder = write_masked_images(tmp_path / "data")
    live = _dataset(folder, mask_from_alpha=True)
    cached = _dataset(folder, mask_from_alpha=True)

    def encode(pixels):
        return torch.zeros(pixels.shape[0], 4, 8, 8), torch.ones(pixels.shape[0], 4, 8, 8)

    attach_caches(cached, tmp_path / "cache", latent_encoder=encode, latent_model_key="fake")
    assert list((tmp_path / "cache" / "masks").rglob("*.safetensors"))
    for epoch in range(3):
        for item in range(len(live)):
            expected, got = live[(epoch, item)], cached[(epoch, item)]
            assert "pixel_values" not in got
            # stored as 8 bits: within half a step of the live mask
            assert torch.allclose(got["mask"], expected["mask"], atol=0.5 / 255), (epoch, item)

"""Acceptance 3: cached latents and text states skip the encoders, train to the same loss, invalidate exactly."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import sdlora.training.run
from sdlora.config import load_config
from sdlora.data import CaptionedImageDataset
from sdlora.data.cache import attach_caches
from sdlora.data.preflight import check
from sdlora.training.run import TrainingRun


class Calls:
    def __init__(self):
        self.vae = self.text = 0


@pytest.fixture
def counted(monkeypatch):
    """Count VAE-encoder and text-encoder forward passes of every base a run loads."""
    calls = Calls()
    load = sdlora.training.run.load_base_model

    def counting_load(*args, **kwargs):
        base = load(*args, **kwargs)
        base.vae.encoder.register_forward_hook(lambda *_: setattr(calls, "vae", calls.vae + 1))
        base.text_encoder.register_forward_hook(lambda *_: setattr(calls, "text", calls.text + 1))
        return base

    monkeypatch.setattr(sdlora.training.run, "load_base_model", counting_load)
    return calls


def test_cached_training_skips_encoders_and_matches_the_loss(make_config, counted, tmp_path):
    common = ["train.steps=6", "data.random_flip=true", "train.seed=3"]
    plain = TrainingRun(make_config(*common, f"output.dir={tmp_path / 'plain'}"))
    plain.build()
    reference = plain.fit().losses
    assert counted.vae > 0 and counted.text > 0

    cached_args = [*common, "data.cache_latents=true", "data.cache_text_embeddings=true",
                   f"data.cache_dir={tmp_path / 'cache'}"]
    first = TrainingRun(make_config(*cached_args, f"output.dir={tmp_path / 'first'}"))
    counted.vae = counted.text = 0
    first.build()
    assert first.cache_stats.latents_encoded == 16  # 8 images x both flips
    assert first.cache_stats.text_encoded == 8
    counted.vae = counted.text = 0
    losses = first.fit().losses  # 6 steps of batch 2 over 8 images: into a second epoch
    assert (counted.vae, counted.text) == (0, 0)
    assert torch.allclose(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6), (losses, reference)

    second = TrainingRun(make_config(*cached_args, f"output.dir={tmp_path / 'second'}"))
    second.build()
    assert (second.cache_stats.latents_encoded, second.cache_stats.text_encoded) == (0, 0)
    assert (second.cache_stats.latents_reused, second.cache_stats.text_reused) == (16, 8)
    second.fit()
    assert (counted.vae, counted.text) == (0, 0)


def _encoders(log):
    def latents(pixels):
        log.append(("latents", pixels.shape[0]))
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return pooled, torch.ones_like(pooled)

    def text(captions):
        # Like the families' encode_text: a dict of named conditioning tensors.
        log.append(("text", len(captions)))
        return {"encoder_hidden_states": torch.stack([torch.full((2, 3), float(len(c))) for c in captions])}

    return latents, text


def _attach(folder, cache, resolution, log):
    config = load_config(None, [f"data.path={folder}", f"data.resolution={resolution}"])
    report = check(config.data)
    dataset = CaptionedImageDataset(report.records, resolution, seed=0)
    latents, text = _encoders(log)
    stats = attach_caches(dataset, cache, latent_encoder=latents, latent_model_key="m", text_encoder=text,
                          text_model_key="t", batch_size=2)
    return dataset, stats


def test_changes_invalidate_exactly_the_affected_entries(tmp_path):
    folder, cache, log = tmp_path / "imgs", tmp_path / "cache", []
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 40), (i * 60, 20, 20)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    dataset, stats = _attach(folder, cache, 32, log)
    assert (stats.latents_encoded, stats.text_encoded) == (4, 4)
    item = dataset[(0, 1)]
    expected = torch.nn.functional.avg_pool2d(CaptionedImageDataset(dataset.records, 32)[(0, 1)]["pixel_values"][None], 8)
    assert torch.allclose(item["latent_mean"], expected[0]) and "pixel_values" not in item
    assert torch.equal(item["encoder_hidden_states"], torch.full((2, 3), float(len("caption 1"))))

    _, stats = _attach(folder, cache, 32, log)
    assert (stats.latents_encoded, stats.text_encoded, stats.latents_reused, stats.text_reused) == (0, 0, 4, 4)

    Image.new("RGB", (48, 40), (1, 2, 3)).save(folder / "2.png")
    (folder / "3.txt").write_text("a new caption")
    _, stats = _attach(folder, cache, 32, log)
    assert (stats.latents_encoded, stats.text_encoded, stats.latents_reused, stats.text_reused) == (1, 1, 3, 3)

    _, stats = _attach(folder, cache, 16, log)
    assert (stats.latents_encoded, stats.text_encoded) == (4, 0)

"""Masked loss and the prior loss weight, through the run's own batches (bucketing, flips and cached latents on)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import write_shapes_dataset
from masked_images import write_masked_images

from sdlora.config import load_config
from sdlora.data import collate
from sdlora.training import loop as train_loop
from sdlora.training.diffusion import latent_mask
from sdlora.training.run import TrainingRun


class _Capture(torch.nn.Module):
    """The UNet, keeping its prediction so the test can read the loss's gradient with respect to it."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def forward(self, *args, **kwargs):
        prediction = self.inner(*args, **kwargs)[0]
        prediction.retain_grad()
        self.prediction = prediction
        return (prediction,)


@pytest.fixture(scope="module")
def masked_run(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    subject = write_masked_images(root / "subject")
    klass = write_shapes_dataset(root / "class", 4, seed=3)
    config = load_config(None, [
        f"model.base={tiny_base}", "data.resolution=64", "train.batch_size=1", f"output.dir={root / 'run'}",
        f"data.sources=[{{path: {subject}}}, {{path: {klass}, regularization: true}}]",
        "data.regularization.prior_loss_weight=3", "data.masked_loss=true", "data.mask_from_alpha=true",
        "data.bucketing.enabled=true", "data.bucketing.step=8", "data.random_flip=true", "data.cache_latents=true",
    ])
    run = TrainingRun(config)
    run.build()
    return run


def test_fully_masked_pixels_give_exactly_zero_gradient(masked_run):
    run = masked_run
    assert run.dataset.mask_cache is not None  # the masks come from the latent cache
    capture = _Capture(run.parts.unet)
    parts = dataclasses.replace(run.parts, unet=capture)
    checked, flips = 0, set()
    for epoch in range(2):
        for item in range(len(run.dataset)):
            record = run.dataset.records[run.dataset.record_index(epoch, item)]
            if record.mask is None and record.path.stem != "cutout":
                continue
            out = run.dataset[(epoch, item)]
            flips.add(out["mask"][0, :, 0].mean().item() > 0.5)  # a mask white on its left or on its right
            batch = collate([out])
            loss = train_loop.micro_step_loss(parts, batch)
            loss.backward()
            gradient = capture.prediction.grad
            masked_out = (latent_mask(batch["masks"], gradient.shape[-2:]) == 0).expand_as(gradient)
            assert masked_out.any() and (~masked_out).any(), record.path.name
            assert torch.count_nonzero(gradient[masked_out]) == 0, record.path.name  # exactly zero
            assert torch.count_nonzero(gradient[~masked_out]) > 0, record.path.name
            run.parts.optimizer.zero_grad(set_to_none=True)
            checked += 1
    assert checked >= 8 and flips == {True, False}


def test_an_unmasked_image_gets_the_unmasked_loss(masked_run):
    run = masked_run
    item = next(i for i in range(len(run.dataset)) if run.dataset.records[run.dataset.record_index(0, i)].path.stem
                == "unmasked")
    batch = collate([run.dataset[(0, item)]])
    assert torch.equal(batch["masks"], torch.ones_like(batch["masks"]))
    losses = []
    for masks in (batch["masks"], None):
        run.parts.generator.manual_seed(7)
        with torch.no_grad():
            losses.append(train_loop.micro_step_loss(run.parts, {**batch, "masks": masks}).item())
    assert losses[0] == losses[1]


def test_the_prior_loss_weight_reaches_only_the_regularization_samples_loss(masked_run):
    run = masked_run
    dataset = run.dataset
    by_role = {}
    for item in range(len(dataset)):
        record = dataset.records[dataset.record_index(0, item)]
        if dataset.item_buckets()[item] == (64, 64):
            by_role.setdefault(record.regularization, item)
    batch = collate([dataset[(0, by_role[False])], dataset[(0, by_role[True])]])
    assert batch["loss_weights"].tolist() == [1.0, 3.0]

    def loss(weights):
        run.parts.generator.manual_seed(11)
        with torch.no_grad():
            return train_loop.micro_step_loss(run.parts, {**batch, "loss_weights": torch.tensor(weights)}).item()

    training_only, unweighted, weighted = loss([1.0, 0.0]), loss([1.0, 1.0]), loss([1.0, 3.0])
    regularization = unweighted - training_only
    assert regularization > 0
    assert weighted == pytest.approx(training_only + 3 * regularization, rel=1e-5)

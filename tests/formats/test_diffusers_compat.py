"""The adapter sdlora writes loads in plain diffusers and gives the same image as sdlora's own generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora import inference
from sdlora.formats import read_adapter
from sdlora.models import load_base_model


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_base, style_dataset):
    """Rank 4 / alpha 8: a file that lost its alpha would load at half strength and fail these tests."""
    from sdlora.config import load_config
    from sdlora.training.run import train

    out = tmp_path_factory.mktemp("compat")
    config = load_config(None, [
        f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64", "train.steps=8",
        "train.batch_size=2", "train.learning_rate=5e-2", "lora.rank=4", "lora.alpha=8",
        "lora.train_text_encoder=true", f"output.dir={out}",
    ])
    return train(config).adapter_path


def _diffusers_image(tiny_base, adapter=None, weight=1.0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="style")
        pipe.set_adapters(["style"], [weight])
    out = pipe("a red circle on a blue background", num_inference_steps=5, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(3), output_type="np")
    return out.images[0]


def _sdlora_image(tiny_base, adapter=None, weight=1.0):
    pipe = inference.build_pipeline(load_base_model(str(tiny_base)), scheduler="ddim")
    if adapter is not None:
        inference.stack_adapters(pipe, [inference.AdapterSpec(str(adapter), weight)])
    image = inference.generate(pipe, "a red circle on a blue background", seed=3, steps=5, guidance_scale=5.0)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_metadata_records_rank_alpha_base_and_config(trained_adapter, tiny_base):
    adapter = read_adapter(trained_adapter)
    assert adapter.shapes["unet"].rank == 4 and adapter.shapes["unet"].alpha == 8.0
    assert adapter.metadata["sdlora.base_model"] == tiny_base.name  # a local base by its folder name only
    assert '"rank": 4' in adapter.metadata["sdlora.training_config"]
    assert adapter.metadata["format"] == "pt"


def test_diffusers_loads_the_file_and_matches_sdlora(trained_adapter, tiny_base):
    ours = _sdlora_image(tiny_base, trained_adapter)
    theirs = _diffusers_image(tiny_base, trained_adapter)
    base = _diffusers_image(tiny_base)
    # Images are quantised to 8 bits by PIL on our side: one level of difference is fp32 noise.
    assert np.abs(ours - theirs).max() <= 1.5 / 255
    assert np.abs(theirs - base).max() > 10 / 255, "adapter had no visible effect"


def test_weight_zero_is_the_base(trained_adapter, tiny_base):
    ours = _sdlora_image(tiny_base, trained_adapter, weight=0.0)
    base = _diffusers_image(tiny_base)
    assert np.abs(ours - base).max() <= 1.5 / 255


def test_weight_matches_diffusers_set_adapters(trained_adapter, tiny_base):
    ours = _sdlora_image(tiny_base, trained_adapter, weight=0.5)
    theirs = _diffusers_image(tiny_base, trained_adapter, weight=0.5)
    assert np.abs(ours - theirs).max() <= 1.5 / 255

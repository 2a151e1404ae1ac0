"""A few CPU training steps on tiny SDXL and SD2-v bases; their adapters load in plain diffusers
(`StableDiffusionXLPipeline` / `StableDiffusionPipeline`) and give the same image as sdlora's generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora import inference
from sdlora.formats import read_adapter
from sdlora.models import load_base_model, lora
from sdlora.training.run import TrainingRun

PROMPT = "a red circle on a blue background"


def _train(base, dataset, out, *extra):
    """Rank 4 / alpha 8 and both text encoders: a lost alpha or a dropped text_encoder_2 shows in the image."""
    from sdlora.config import load_config

    config = load_config(None, [
        f"model.base={base}", f"data.path={dataset}", "data.resolution=64", "train.steps=4", "train.batch_size=2",
        "train.learning_rate=5e-2", "lora.rank=4", "lora.alpha=8", "lora.train_text_encoder=true",
        f"output.dir={out}", *extra,
    ])
    run = TrainingRun(config)
    run.build()
    before = {n: p.detach().clone() for n, p in run.checkpointer.trainable.items()}
    result = run.fit()
    moved = {n.split(".")[0] for n, p in run.checkpointer.trainable.items() if not torch.equal(p, before[n])}
    return run, result, moved


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl_base, style_dataset):
    return _train(tiny_sdxl_base, style_dataset, tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd2v_run(tmp_path_factory, tiny_sd2v_base, style_dataset):
    return _train(tiny_sd2v_base, style_dataset, tmp_path_factory.mktemp("sd2v"), "train.zero_terminal_snr=true")


def _diffusers_image(pipeline_class, folder, adapter=None, weight=1.0):
    from diffusers import DDIMScheduler

    extra = {"add_watermarker": False} if pipeline_class.__name__.endswith("XLPipeline") else {"safety_checker": None}
    pipe = pipeline_class.from_pretrained(str(folder), **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="style")
        pipe.set_adapters(["style"], [weight])
    out = pipe(PROMPT, num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
               output_type="np")
    return out.images[0]


def _sdlora_image(folder, adapter, weight=1.0, fuse=False):
    pipe = inference.build_pipeline(load_base_model(str(folder)), scheduler="ddim")
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(adapter), weight)])
    if fuse:
        stack.fuse()
    image = inference.generate(pipe, PROMPT, seed=3, steps=5, guidance_scale=5.0)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_sdxl_trains_both_text_encoders_and_records_the_family(sdxl_run):
    run, result, moved = sdxl_run
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert moved == {"unet", "text_encoder", "text_encoder_2"}
    adapter = read_adapter(result.adapter_path)
    assert adapter.components == ["unet", "text_encoder", "text_encoder_2"]
    assert adapter.shapes["text_encoder_2"].alpha == 8.0
    assert any(k.endswith("self_attn.q_proj.lora_A.weight") for k in adapter.tensors["text_encoder_2"])
    assert adapter.metadata["sdlora.family"] == "sdxl"
    assert adapter.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert adapter.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_adapter_loads_in_diffusers_and_matches_sdlora(sdxl_run, tiny_sdxl_base):
    from diffusers import StableDiffusionXLPipeline

    adapter = sdxl_run[1].adapter_path
    theirs = _diffusers_image(StableDiffusionXLPipeline, tiny_sdxl_base, adapter)
    ours = _sdlora_image(tiny_sdxl_base, adapter)
    base = _diffusers_image(StableDiffusionXLPipeline, tiny_sdxl_base)
    # PIL quantises our image to 8 bits: one level is fp32 noise.
    assert np.abs(ours - theirs).max() <= 1.5 / 255
    assert np.abs(theirs - base).max() > 10 / 255, "adapter had no visible effect"
    # Fusing reorders fp32 sums; with this deliberately strong adapter that moves up to two 8-bit levels.
    assert np.abs(_sdlora_image(tiny_sdxl_base, adapter, fuse=True) - theirs).max() <= 2.5 / 255


def test_sdxl_text_encoder_2_adapter_is_part_of_the_image(sdxl_run, tiny_sdxl_base):
    """Weight 0 on text_encoder_2 alone must change the image: its LoRA is applied, not just loaded."""
    pipe = inference.build_pipeline(load_base_model(str(tiny_sdxl_base)), scheduler="ddim")
    inference.stack_adapters(pipe, [inference.AdapterSpec(str(sdxl_run[1].adapter_path))])
    full = inference.generate(pipe, PROMPT, seed=3, steps=5, guidance_scale=5.0)[0]
    lora.set_weights(pipe.text_encoder_2, {})
    without_te2 = inference.generate(pipe, PROMPT, seed=3, steps=5, guidance_scale=5.0)[0]
    assert np.abs(np.asarray(full, np.float32) - np.asarray(without_te2, np.float32)).max() > 4


def test_sd2v_trains_with_v_targets_and_zero_terminal_snr(sd2v_run):
    run, result, moved = sd2v_run
    assert run.parts.prediction_type == "v_prediction"
    assert run.parts.noise_scheduler.alphas_cumprod[-1] <= 2**-24
    assert all(np.isfinite(result.losses)) and moved == {"unet", "text_encoder"}
    metadata = read_adapter(result.adapter_path).metadata
    assert metadata["sdlora.family"] == "sd2-v" and metadata["ss_base_model_version"] == "sd_v2_v"
    assert metadata["ss_v2"] == "True" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_sd2v_adapter_exports_to_kohya_with_its_family(sd2v_run, tmp_path):
    """The kohya header reads the one family table: an `sd2-v` adapter (once a KeyError, when the header code had
    its own table spelt `sd2_v`) says v2 and v-parameterization, as kohya's tools expect."""
    from sdlora import formats

    path = formats.save_kohya(tmp_path / "kohya.safetensors", read_adapter(sd2v_run[1].adapter_path))
    header = read_adapter(path).metadata
    assert header["ss_base_model_version"] == "sd_v2_v" and header["ss_v2"] == "True"
    assert header["ss_v_parameterization"] == "True" and header["modelspec.prediction_type"] == "v"
    assert header["ss_resolution"] == "(64, 64)" and header["modelspec.implementation"] == "diffusers"


def test_sd2v_adapter_loads_in_diffusers_and_matches_sdlora(sd2v_run, tiny_sd2v_base):
    from diffusers import StableDiffusionPipeline

    adapter = sd2v_run[1].adapter_path
    theirs = _diffusers_image(StableDiffusionPipeline, tiny_sd2v_base, adapter)
    ours = _sdlora_image(tiny_sd2v_base, adapter)
    base = _diffusers_image(StableDiffusionPipeline, tiny_sd2v_base)
    assert np.abs(ours - theirs).max() <= 1.5 / 255
    assert np.abs(theirs - base).max() > 10 / 255, "adapter had no visible effect"

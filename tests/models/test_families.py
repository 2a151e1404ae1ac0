"""SD1, SD2-v and SDXL: detection, conditioning, targets; SD1's path is what it was."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sdlora.data import collate
from sdlora.data.transforms import apply_placement, plan_crop
from sdlora.models import ModelLoadError, families, load_base_model, single_file_family
from sdlora.training import diffusion
from sdlora.training.run import TrainingRun


def test_family_is_detected_from_the_components(tiny_base, tiny_sd2v_base, tiny_sdxl_base):
    sd1, sd2v, sdxl = (load_base_model(str(p)) for p in (tiny_base, tiny_sd2v_base, tiny_sdxl_base))
    assert (sd1.family, sd1.prediction_type, sd1.text_encoder_2) == ("sd1", "epsilon", None)
    assert (sd2v.family, sd2v.prediction_type) == ("sd2-v", "v_prediction")
    assert sdxl.family == "sdxl"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert list(sdxl.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert not any(p.requires_grad for p in sdxl.text_encoder_2.parameters())


def test_declared_family_is_checked_and_sd2v_predicts_v(tiny_base):
    with pytest.raises(ModelLoadError, match="model.family: 'sdxl'.*no text_encoder_2"):
        load_base_model(str(tiny_base), family="sdxl")
    declared = load_base_model(str(tiny_base), family="sd2-v")
    assert declared.family == "sd2-v" and declared.prediction_type == "v_prediction"


def test_single_file_family_from_keys(tmp_path):
    from safetensors.torch import save_file

    markers = {
        "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "sd1": "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
    for family, key in markers.items():
        path = tmp_path / f"{family}.safetensors"
        save_file({key: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}, str(path))
        assert single_file_family(path) == family
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(1)}, str(unknown))
    assert single_file_family(unknown) is None
    with pytest.raises(ModelLoadError, match="set model.family"):
        load_base_model(str(unknown))


def test_sdxl_single_file_loads_through_the_xl_pipeline(tmp_path, tiny_sdxl_base, monkeypatch):
    """A file with SDXL keys goes to StableDiffusionXLPipeline.from_single_file with the config folder."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(path))
    calls = []

    def fake_from_single_file(cls, source, **kwargs):
        calls.append((cls.__name__, source, kwargs.get("config")))
        return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_base))

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake_from_single_file))
    base = load_base_model(str(path), single_file_config=str(tiny_sdxl_base))
    assert calls == [("StableDiffusionXLPipeline", str(path), str(tiny_sdxl_base))]
    assert base.family == "sdxl" and base.tokenizer_2 is not None and base.text_encoder_2 is not None


def test_add_time_ids_of_a_cropped_bucketed_image():
    """200x100 (w x h) into a 96x64 bucket: scale 0.64 -> 128x64, center crop left (128-96)//2 = 16, top 0."""
    import random

    wide = Image.new("RGB", (200, 100), "red")
    tall = Image.new("RGB", (60, 150), "blue")  # into 64x64: scale 64/60 -> 64x160, top (160-64)//2 = 48
    items = []
    for image, size in ((wide, (64, 96)), (tall, (64, 64))):
        resized, placement = plan_crop((image.height, image.width), size, "center", random.Random(0))
        pixels = apply_placement(image, resized, placement)
        items.append({"pixel_values": pixels[:, :64, :64], "caption": "", "original_size": placement.original_size,
                      "crop_top_left": placement.crop_top_left, "target_size": placement.target_size, "index": 0,
                      "loss_weight": 1.0})
    ids = families.add_time_ids(collate(items))
    expected = torch.tensor([[100, 200, 0, 16, 64, 96], [150, 60, 48, 0, 64, 64]], dtype=torch.float32)
    assert torch.equal(ids, expected)


def test_sdxl_conditioning_matches_diffusers_encode_prompt(tiny_sdxl_base):
    from diffusers import StableDiffusionXLPipeline

    base = load_base_model(str(tiny_sdxl_base))
    conditioning = families.conditioning_for("sdxl", base.tokenizers, base.text_encoders.values(), "cpu", False)
    captions = ["a red circle on a blue background", "a star"]
    batch = {"captions": captions, "original_sizes": [(100, 200), (64, 64)], "crop_top_lefts": [(0, 16), (0, 0)],
             "target_sizes": [(64, 96), (64, 64)]}
    states, added = conditioning(batch)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_base))
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert states.shape == (2, base.tokenizer.model_max_length, 32 + 64)
    assert torch.allclose(states, embeds, atol=1e-6) and torch.allclose(added["text_embeds"], pooled, atol=1e-6)
    assert torch.equal(added["time_ids"][0], torch.tensor([100.0, 200, 0, 16, 64, 96]))
    # A text cache stores encode_text's outputs; a batch carrying them gives the same conditioning.
    cached = dict(batch, **conditioning.encode_text(captions))
    cached["captions"] = ["ignored"] * 2
    states_cached, added_cached = conditioning(cached)
    assert torch.equal(states_cached, states) and torch.equal(added_cached["text_embeds"], added["text_embeds"])


def test_v_prediction_target_is_the_formula(tiny_sd2v_base):
    base = load_base_model(str(tiny_sd2v_base))
    # SD's scaled-linear schedule, by hand.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    eps = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    target = diffusion.training_target(base.scheduler, x0, eps, t, base.prediction_type)
    ab = alpha_bar[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(target, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-5)

    rescaled = families.with_zero_terminal_snr(base.scheduler, "v_prediction")
    # diffusers keeps 2**-24 instead of an exact 0 at the last step (an exact 0 divides by zero in samplers)
    assert rescaled.alphas_cumprod[-1] <= 2**-24 and base.scheduler.alphas_cumprod[-1] > 1e-3
    # At zero terminal SNR the input is pure noise and the v target is -x0.
    last = diffusion.training_target(rescaled, x0, eps, torch.tensor([999] * 3), "v_prediction")
    assert torch.allclose(last, -x0, atol=2e-3)
    with pytest.raises(ValueError, match="train.zero_terminal_snr: needs a v-prediction"):
        families.with_zero_terminal_snr(base.scheduler, "epsilon")


def test_sd1_epsilon_path_is_unchanged(make_config):
    """SD1 conditions on the text encoder's last hidden state of the padded prompt, epsilon target; the bits of
    a whole run are pinned by test_pinned_adapter."""
    run = TrainingRun(make_config())
    run.build()
    parts = run.parts
    assert type(parts.conditioning) is families.Conditioning and parts.prediction_type == "epsilon"
    batch = collate([run.dataset[(0, i)] for i in range(2)])
    states, added = parts.conditioning(batch)
    tokenizer = run.base.tokenizer
    tokens = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert added is None and torch.equal(states, parts.text_encoder(tokens, return_dict=False)[0])
    noise = torch.randn(2, 4, 8, 8)
    assert diffusion.training_target(parts.noise_scheduler, noise * 0, noise, torch.tensor([1, 2]), "epsilon") is noise


def test_config_offers_exactly_the_families_of_the_table():
    """config sits below models, so `model.family` spells its choices out; they must be the table's names."""
    from typing import get_args

    from sdlora.config.schema import ModelSection

    offered = get_args(ModelSection.model_fields["family"].annotation)
    literal = next(arg for arg in offered if arg is not type(None))
    assert get_args(literal) == families.FAMILIES


def test_family_presets():
    from pathlib import Path

    from sdlora.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    sdxl = load_config(configs / "sdxl-gpu.yaml")
    assert sdxl.data.resolution == 1024 and sdxl.train.mixed_precision == "bf16"
    assert sdxl.train.gradient_checkpointing and sdxl.train.optimizer == "adamw8bit"
    sd21 = load_config(configs / "sd21-gpu.yaml")
    assert sd21.data.resolution == 768 and sd21.train.prediction_type == "v_prediction"
    assert sd21.train.zero_terminal_snr

"""kohya / A1111 / ComfyUI files: exact round trips, diffusers loads them, metadata, unknown layouts refused."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from adapter_factory import make_adapter
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora import formats, inference
from sdlora.models import load_base_model

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base_model(str(tiny_base))


@pytest.fixture(scope="module")
def adapter(base):
    """Rank 4 / alpha 8 on UNet and text encoder: a reader that dropped alpha would load it at half strength."""
    return make_adapter(base.unet, base.text_encoder, rank=4, alpha=8.0, seed=1)


def _keys(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys()), dict(handle.metadata() or {})


def test_peft_to_kohya_to_peft_is_exact(adapter, tmp_path):
    peft_path = formats.save_diffusers(tmp_path / "a.safetensors", adapter)
    kohya_path = formats.convert(peft_path, tmp_path / "a_kohya.safetensors", to="kohya")
    back_path = formats.convert(kohya_path, tmp_path / "a_back.safetensors", to="diffusers")
    back = formats.read_adapter(back_path)
    assert formats.read_adapter(kohya_path).format == "kohya"
    for component in ("unet", "text_encoder"):
        assert back.tensors[component].keys() == adapter.tensors[component].keys()
        for key, tensor in adapter.tensors[component].items():
            assert torch.equal(back.tensors[component][key], tensor), key
        assert back.shapes[component] == adapter.shapes[component]
    keys, header = _keys(kohya_path)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert all("." not in key.partition(".")[0] for key in keys)
    with safe_open(str(kohya_path), framework="pt") as handle:
        assert handle.get_tensor(f"{name}.alpha").item() == 8.0 and handle.get_tensor(f"{name}.alpha").dim() == 0
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0"


def test_kohya_header_and_model_hash(adapter, tmp_path):
    adapter = formats.AdapterFile(adapter.tensors, adapter.shapes, {
        **adapter.metadata, "sdlora.trigger_words": "sks style", "sdlora.recommended_weight": "0.8",
        "sdlora.base_model": "sdlora:tiny"})
    path = formats.save_kohya(tmp_path / "style.safetensors", adapter, dtype=torch.float16)
    keys, header = _keys(path)
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_v2"] == "False"
    assert header["ss_output_name"] == "style" and header["modelspec.title"] == "style"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["modelspec.sai_model_spec"] == "1.0.1"
    assert header["modelspec.trigger_phrase"] == "sks style"
    assert header["sdlora.recommended_weight"] == "0.8"
    blob = path.read_bytes()
    header_size = struct.unpack("<Q", blob[:8])[0]
    assert header["sshs_model_hash"] == hashlib.sha256(blob[8 + header_size:]).hexdigest()
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor(next(iter(keys))).dtype == torch.float16
    info = formats.describe(path)
    assert info["format"] == "kohya" and info["components"]["unet"]["rank"] == 4
    assert info["components"]["text_encoder"]["dtype"] == "float16"
    assert info["metadata"]["sdlora.trigger_words"] == "sks style"


def test_missing_alpha_means_alpha_equals_rank(adapter, tmp_path):
    path = formats.save_kohya(tmp_path / "a.safetensors", adapter)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "no_alpha.safetensors"))
    read = formats.read_adapter(tmp_path / "no_alpha.safetensors")
    assert read.shapes["unet"].alpha == 4.0 and read.shapes["unet"].alpha_pattern == {}


def test_per_module_alpha_is_kept(adapter, tmp_path):
    path = formats.save_kohya(tmp_path / "a.safetensors", adapter)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    odd = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    tensors[f"{odd}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    shape = formats.read_adapter(tmp_path / "odd.safetensors").shapes["unet"]
    assert shape.alpha == 8.0
    assert shape.alpha_pattern == {"up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": 2.0}


def test_unknown_key_layout_is_refused_listing_keys(adapter, tmp_path):
    path = formats.save_kohya(tmp_path / "a.safetensors", adapter)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"] = torch.zeros(2, 2)
    tensors["lora_unet_mid_block_attentions_0_proj_in.dora_scale"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    with pytest.raises(formats.AdapterFormatError) as info:
        formats.read_adapter(tmp_path / "loha.safetensors")
    message = str(info.value)
    # a LoHa layer with only one of its four factors: refused as incomplete, naming its keys (formats.lycoris)
    assert "loha.safetensors" in message and "missing hada_w1_b, hada_w2_a, hada_w2_b" in message
    assert "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a" in message
    assert "lora_unet_mid_block_attentions_0_proj_in.dora_scale" in message

    save_file({"model.diffusion_model.foo.weight": torch.zeros(1), "bar": torch.zeros(1)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(formats.AdapterFormatError, match=r"model\.diffusion_model\.foo\.weight.*|bar"):
        formats.read_adapter(tmp_path / "other.safetensors")


def test_kohya_down_without_up_is_listed(adapter, tmp_path):
    path = formats.save_kohya(tmp_path / "a.safetensors", adapter)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    orphan = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    del tensors[orphan]
    save_file(tensors, str(tmp_path / "orphan.safetensors"))
    with pytest.raises(formats.AdapterFormatError, match="attn1_to_q.lora_down.weight"):
        formats.read_adapter(tmp_path / "orphan.safetensors")


def _diffusers_image(tiny_base, folder, weight_name, weight=1.0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if weight_name:
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="x")
        pipe.set_adapters(["x"], [weight])
    out = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
               output_type="np")
    return out.images[0]


def test_kohya_file_in_diffusers_equals_peft_file(adapter, tiny_base, tmp_path):
    formats.save_diffusers(tmp_path / "peft.safetensors", adapter)
    formats.save_kohya(tmp_path / "kohya.safetensors", adapter)
    peft_image = _diffusers_image(tiny_base, tmp_path, "peft.safetensors", 0.7)
    kohya_image = _diffusers_image(tiny_base, tmp_path, "kohya.safetensors", 0.7)
    base_image = _diffusers_image(tiny_base, tmp_path, None)
    assert np.abs(peft_image - kohya_image).max() < 1e-4
    assert np.abs(peft_image - base_image).max() > 0.05, "adapter had no visible effect"
    # and sdlora's own stack reads the kohya file to the same image
    pipe = inference.build_pipeline(load_base_model(str(tiny_base)), scheduler="ddim")
    inference.stack_adapters(pipe, [inference.AdapterSpec(str(tmp_path / "kohya.safetensors"), 0.7)])
    ours = np.asarray(inference.generate(pipe, PROMPT, seed=3, steps=4, guidance_scale=5.0)[0], np.float32) / 255
    assert np.abs(ours - peft_image).max() <= 1.5 / 255


def test_diffusers_file_with_text_model_prefix_reads(adapter, tmp_path):
    """Files written under transformers 4 name text-encoder modules `text_model.encoder...`."""
    state = {f"text_encoder.text_model.{k}": v for k, v in adapter.tensors["text_encoder"].items()}
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    read = formats.read_adapter(tmp_path / "old.safetensors")
    assert read.tensors["text_encoder"].keys() == adapter.tensors["text_encoder"].keys()


def test_adapter_metadata_json_is_minimal(adapter, tmp_path):
    _, header = _keys(formats.save_diffusers(tmp_path / "a.safetensors", adapter))
    config = json.loads(header["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 8.0 and config["text_encoder.r"] == 4

"""An SD3 single file in Stability's original layout loads offline through a local config folder, and the family,
table row and native resolution of an SD3 base are read without loading it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sdlora.config import load_config
from sdlora.formats.singlefile_sd3 import save_sd3_single_file
from sdlora.models import families, load_base_model, native_resolution, single_file_family


@pytest.fixture(scope="module")
def sd3_single_file(tiny_sd3_base, tmp_path_factory):
    base = load_base_model(str(tiny_sd3_base))
    path = save_sd3_single_file(base, tmp_path_factory.mktemp("sd3-file") / "tiny_sd3.safetensors")
    return base, path


def test_the_file_is_in_the_original_mmdit_layout(sd3_single_file):
    _, path = sd3_single_file
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.bias" in keys
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in keys
    assert "first_stage_model.decoder.conv_in.weight" in keys
    assert not any("transformer_blocks" in key for key in keys)
    assert single_file_family(path) == "sd3"


@pytest.mark.parametrize("t5", [True, False])
def test_an_sd3_single_file_loads_offline_with_a_local_config_folder(sd3_single_file, tiny_sd3_base, t5):
    base, path = sd3_single_file
    loaded = load_base_model(str(path), single_file_config=str(tiny_sd3_base), use_t5=t5)
    assert loaded.family == "sd3" and type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (loaded.text_encoder_3 is not None) == t5
    for ours, theirs in ((base.unet, loaded.unet), (base.vae, loaded.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), "a weight changed on the way through the file"


def test_the_family_row_and_the_native_resolution(tiny_sd3_base):
    row = families.TABLE["sd3"]
    assert (row.prediction_type, row.resolution, row.pipeline_class) == ("flow", 1024, "StableDiffusion3Pipeline")
    assert row.license == "stabilityai-ai-community"
    assert native_resolution(load_config(None, [f"model.base={tiny_sd3_base}"]).model).side == 64


def test_declaring_the_wrong_family_names_the_field(tiny_sd3_base):
    from sdlora.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="model.family: 'sdxl', but .* is an SD3 base"):
        load_base_model(str(tiny_sd3_base), family="sdxl")
    assert load_base_model(str(tiny_sd3_base), family="sd3").family == "sd3"

"""Single-file checkpoints: sdlora writes the original (LDM) layout and loads it back through diffusers'
`from_single_file` offline, with the local diffusers folder as config."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from sdlora.formats.singlefile import save_single_file, to_ldm_checkpoint
from sdlora.models import ModelLoadError, load_base_model


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base_model(str(tiny_base))


def test_diffusers_own_converter_inverts_ours(base):
    ldm = to_ldm_checkpoint(base.unet, base.vae, base.text_encoder)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks") for k in ldm)
    unet_back = convert_ldm_unet_checkpoint(ldm, dict(base.unet.config))
    assert unet_back.keys() == base.unet.state_dict().keys()
    for key, value in base.unet.state_dict().items():
        assert torch.equal(unet_back[key], value), key
    vae_back = convert_ldm_vae_checkpoint(ldm, dict(base.vae.config))
    assert vae_back.keys() == base.vae.state_dict().keys()
    for key, value in base.vae.state_dict().items():
        assert torch.equal(vae_back[key].reshape(value.shape), value), key


def test_single_file_loads_offline_and_matches_the_folder(base, tiny_base, tmp_path):
    path = save_single_file(base, tmp_path / "tiny.safetensors")
    loaded = load_base_model(str(path), single_file_config=str(tiny_base))
    assert loaded.source == str(path)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(base, name).state_dict(), getattr(loaded, name).state_dict()
        for key, value in ours.items():
            assert torch.equal(theirs[key], value), f"{name}.{key}"
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        load_base_model(str(path))


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "nope.safetensors"))

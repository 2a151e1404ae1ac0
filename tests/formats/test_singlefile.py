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


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_one_unet_key_map_round_trips_every_key_of_the_tiny_bases(family):
    """Single-file export and kohya's SDXL names use the one diffusers <-> LDM map (`ldm.to_sgm`): every UNet
    weight of the tiny SD1 and SDXL bases gets its own LDM name and maps back to itself, the exporter writes exactly
    those names, and diffusers' own converter reads them back to the same weights."""
    from sdlora.formats import ldm
    from sdlora.formats.singlefile import UNET_PREFIX, unet_to_ldm
    from sdlora.models import tiny

    build = tiny.build_tiny_components if family == "sd1" else tiny.build_tiny_sdxl_components
    unet = build()["unet"]
    state, layers = unet.state_dict(), unet.config.layers_per_block
    attention = ldm.up_attention(state)
    names = {key: ldm.to_sgm(key, up_attention_blocks=attention, layers_per_block=layers) for key in state}
    assert len(set(names.values())) == len(state)
    assert {key: ldm.from_sgm(name, layers) for key, name in names.items()} == {key: key for key in state}
    exported = unet_to_ldm(state, unet.config)
    assert list(exported) == [UNET_PREFIX + names[key] for key in state]
    back = convert_ldm_unet_checkpoint(exported, dict(unet.config))
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key


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

"""Files sdlora writes for every adapter type load in the LyCORIS reference (the `lycoris-lora` package) and give
the outputs of the peft model that was saved (acceptance 1, "loads in LyCORIS"): the same UNet and text-encoder
outputs within 1e-5, on the tiny SD1 and SDXL bases, with adapters initialised non-zero so they change the output.

This proves the conventions the writer translates: peft's DoRA magnitude [out] as LyCORIS's `dora_scale` [out, 1],
peft's LoHa/LoKr alpha / r against LyCORIS's (LoKr with two full factors: LyCORIS scale 1), LoCon's conv kernels,
and kohya's module names (SDXL's SGM UNet names are turned back to diffusers paths for LyCORIS, which names modules
the way the model it is given does; ComfyUI and A1111 read the SGM names: tests/formats/test_lycoris_keys.py).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from lycoris_cases import CASES, WithTextModel, save_case
from safetensors.torch import load_file

from sdlora.formats import kohya

lycoris = pytest.importorskip("lycoris")

def _inputs(family: str, unet, generator):
    config = unet.config
    side = config.sample_size
    batch = {"sample": torch.randn(1, config.in_channels, side, side, generator=generator),
             "timestep": torch.tensor([500]),
             "encoder_hidden_states": torch.randn(1, 7, config.cross_attention_dim, generator=generator)}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        batch["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return batch


def _outputs(family: str, unet, encoders, ids):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out = {"unet": unet(**_inputs(family, unet, generator)).sample}
        for name, encoder in encoders.items():
            out[name] = encoder(ids).last_hidden_state
    return out


def _diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGM UNet names (SDXL files) back to diffusers paths, the names LyCORIS finds on a diffusers UNet."""
    out = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        if name.startswith("lora_unet_"):
            name = kohya.module_name("unet", kohya.parse_module_name(name)[1], "sd")
        out[f"{name}.{part}"] = value
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_saved_file_applied_by_lycoris_matches_sdlora(case, family, tmp_path):
    from sdlora.models.tiny import build_tiny_components, build_tiny_sdxl_components

    if family == "sdxl" and case not in ("locon", "dora", "lokr-decomposed"):
        pytest.skip("SDXL: one case per convention is enough (the SD1 cases cover the rest)")
    parts = (build_tiny_sdxl_components if family == "sdxl" else build_tiny_components)(seed=0)
    encoders = {name: parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts}
    pristine = copy.deepcopy({"unet": parts["unet"], **encoders})
    ids = torch.randint(0, parts["text_encoder"].config.vocab_size - 2, (1, 8), generator=torch.Generator().manual_seed(3))
    base = _outputs(family, parts["unet"], encoders, ids)

    path = save_case(case, family, {"unet": parts["unet"], **encoders}, tmp_path / f"{case}.safetensors")
    ours = _outputs(family, parts["unet"], encoders, ids)

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    unet = pristine["unet"]
    theirs_encoders = {name: pristine[name] for name in encoders}
    # One LyCORIS network per model (its generic `create_lycoris_from_weights`, which names modules
    # `lycoris_<path>`); its kohya front end builds a default network on the way, which trips over the tiny UNet.
    roots = {"lora_unet_": unet, "lora_te1_" if family == "sdxl" else "lora_te_": WithTextModel(theirs_encoders[
        "text_encoder"]), **({"lora_te2_": theirs_encoders["text_encoder_2"]} if family == "sdxl" else {})}
    state = _diffusers_names(load_file(str(path)))
    found = 0
    for prefix, root in roots.items():
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        network, _ = lycoris.create_lycoris_from_weights(1.0, None, root, weights_sd=part)
        network.apply_to()
        found += len(network.loras)
    assert found == len({key.partition(".")[0] for key in state})  # LyCORIS found every module the file names
    theirs = _outputs(family, unet, theirs_encoders, ids)

    for name, value in ours.items():
        assert (value - base[name]).abs().max() > 1e-3, f"{case}: the adapter does not change {name}"
        diff = float((value - theirs[name]).abs().max())
        print(f"{family} {case} {name}: max |sdlora - LyCORIS| = {diff:.2e}")
        assert diff < 1e-5, (case, family, name, diff)


def test_locon_run_file_loads_in_diffusers_with_sdlora_outputs(tmp_path):
    """LoCon keeps the diffusers layout a plain LoRA has: `load_lora_weights` reads its convolution LoRA at the conv
    rank and conv alpha (lora_adapter_metadata's rank/alpha patterns) and gives the peft model's outputs."""
    from diffusers import StableDiffusionPipeline

    from sdlora.models.tiny import build_tiny_components

    parts = build_tiny_components(seed=0)
    pristine = copy.deepcopy(parts)
    encoders = {"text_encoder": parts["text_encoder"]}
    path = save_case("locon", "sd1", {"unet": parts["unet"], **encoders}, tmp_path / "locon.safetensors", layout="run")
    ids = torch.randint(0, parts["text_encoder"].config.vocab_size - 2, (1, 8), generator=torch.Generator().manual_seed(3))
    ours = _outputs("sd1", parts["unet"], encoders, ids)

    pipe = StableDiffusionPipeline(**pristine, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert any("conv1.lora_A" in name for name, _ in pipe.unet.named_parameters())
    theirs = _outputs("sd1", pipe.unet, {"text_encoder": pipe.text_encoder}, ids)
    for name, value in ours.items():
        diff = float((value - theirs[name]).abs().max())
        print(f"locon diffusers {name}: max |sdlora - diffusers| = {diff:.2e}")
        assert diff < 1e-5, (name, diff)

"""Acceptance 2: every key of every kohya/LyCORIS-layout file sdlora saves, for each adapter type on the tiny SD1
and SDXL bases, is one ComfyUI's and AUTOMATIC1111's loaders accept.

Their conventions, re-typed from their sources (ComfyUI `comfy/lora.py` and `comfy/weight_adapter/{lora,loha,lokr}.py`;
A1111 `extensions-builtin/Lora/network_{lora,hada,lokr}.py` and `network.py`): a key is `<module>.<part>`, the
module `lora_unet_…`, `lora_te_…` (SD1/SD2) or `lora_te1_…`/`lora_te2_…` (SDXL) with no dot in it; a module is
LoRA when it has `lora_up.weight` (and `lora_down.weight`), LoHa when it has all four `hada_w{1,2}_{a,b}`, LoKr when
it has `lokr_w1` or `lokr_w1_a`+`lokr_w1_b` and `lokr_w2` or `lokr_w2_a`+`lokr_w2_b`; any of them may add a 0-dim
`alpha` and a `dora_scale`, which ComfyUI applies on the output axis when `dora_scale.shape[0]` is the layer's
output width. Module names against the full SD1.5 / SDXL module maps: tests/formats/test_kohya_naming.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from lycoris_cases import CASES, save_case
from safetensors import safe_open

from sdlora.formats import kohya

PARTS = {  # what each loader reads per module type
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"},
}
PREFIXES = {"sd1": ("lora_unet_", "lora_te_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}
EXPECTED = {"lora": "lora", "locon": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr", "lokr-decomposed": "lokr"}


def _module_type(parts: set[str]) -> str | None:
    """The type ComfyUI / A1111 detect for a module from its part names (None: neither would load it)."""
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    return "lokr" if w1 and w2 else None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_saved_key_follows_comfyui_and_a1111(case, family, tmp_path):
    from sdlora.models.tiny import build_tiny_components, build_tiny_sdxl_components

    parts = (build_tiny_sdxl_components if family == "sdxl" else build_tiny_components)(seed=0)
    models = {name: parts[name] for name in ("unet", "text_encoder", "text_encoder_2") if name in parts}
    path = save_case(case, family, models, tmp_path / f"{case}.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        header = handle.metadata()

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, dot, part = key.partition(".")
        assert dot and name.startswith(PREFIXES[family]), key
        modules.setdefault(name, {})[part] = tensor
    assert {name.split("_")[1] for name in modules} == ({"unet", "te"} if family == "sd1" else {"unet", "te1", "te2"})

    convs = 0
    for name, found in modules.items():
        kind = _module_type(set(found))
        assert kind == EXPECTED[case], (name, sorted(found))
        assert set(found) <= PARTS[kind], (name, sorted(set(found) - PARTS[kind]))
        assert found["alpha"].dim() == 0, name
        if case == "dora":
            scale, out = found["dora_scale"], found["lora_up.weight"].shape[0]
            assert scale.shape[0] == out and all(size == 1 for size in scale.shape[1:]), (name, scale.shape)
        else:
            assert "dora_scale" not in found, name
        # the name goes back to a module of the model it was trained on (kohya's naming, SGM for SDXL's UNet)
        component, module_path = kohya.parse_module_name(name)
        layer = models[component].get_submodule(module_path).get_base_layer()  # under peft's wrapper
        convs += isinstance(layer, torch.nn.Conv2d)
    assert convs > 0 if CASES[case].get("conv_rank") else convs == 0

    assert header["ss_network_dim"] and header["ss_network_alpha"]
    if case in ("lora", "locon"):  # kohya's own LoRA / LoCon: networks.lora, conv_dim in its network args
        assert header["ss_network_module"] == "networks.lora"
        assert ("ss_network_args" in header) == (case == "locon")
    else:
        assert header["ss_network_module"] == "lycoris.kohya"
        args = json.loads(header["ss_network_args"])
        assert args["algo"] == {"dora": "locon", "loha": "loha"}.get(case, "lokr")
        assert ("conv_dim" in args) == bool(CASES[case].get("conv_rank"))
        assert header["sdlora.adapter_type"] == case.partition("-")[0]
        assert "ComfyUI" in header["sdlora.loads_in"] and "LyCORIS" in header["sdlora.loads_in"]

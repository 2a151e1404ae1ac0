"""Every key sdlora writes in kohya format names a real module under the naming A1111, ComfyUI and sd-scripts use.

Checked against the full SD1.5 and SDXL module lists, built from diffusers' own configs of those UNets and the
CLIP text-encoder configs. The models are built on the meta device (`accelerate.init_empty_weights`): only module
names and shapes matter here, and an SDXL UNet with real random weights takes 10 GB. The A1111 and ComfyUI key
maps are re-implemented below from their sources (A1111 `extensions-builtin/Lora/networks.py`
`convert_diffusers_name_to_compvis`; ComfyUI `comfy/lora.py` `model_lora_keys_unet` / `model_lora_keys_clip`), and
the SGM (LDM) module paths are checked with diffusers' own LDM checkpoint converter.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from accelerate import init_empty_weights
from adapter_factory import make_adapter
from safetensors import safe_open

from sdlora import formats
from sdlora.formats import kohya, ldm

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")


@functools.lru_cache(maxsize=1)
def _sdxl():
    return _build(SDXL_UNET, CLIP_L, CLIP_BIGG)


def _build(unet_config, *text_configs):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        encoders = [CLIPTextModel(CLIPTextConfig(**text_configs[0]))]
        if len(text_configs) > 1:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])))
    return unet, encoders


def _kohya_keys(tmp_path, adapter):
    path = formats.save_kohya(tmp_path / "full.safetensors", adapter)
    with safe_open(str(path), framework="pt") as handle:
        return {key.partition(".")[0] for key in handle.keys()}, path


def _a1111_compvis(key: str) -> str:
    """AUTOMATIC1111's convert_diffusers_name_to_compvis (SD1, unet + te), re-typed from its source."""
    suffix = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
         f"{suffix.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_"
         f"{suffix.get(m[2], m[2]) if m[0] == 'resnets' else m[2]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
         f"{suffix.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
         f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"),
    ]
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return build([int(g) if g.isdigit() else g for g in match.groups()])
    return key


def _ldm_names(unet) -> set[str]:
    """Module names of the LDM/SGM UNet, obtained from diffusers' LDM -> diffusers converter (inverted)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = unet.state_dict()
    sgm_state = {"model.diffusion_model." + ldm.to_sgm(k, up_attention_blocks=_up_attention(unet)): v
                 for k, v in state.items()}
    converted = convert_ldm_unet_checkpoint(sgm_state, dict(unet.config))
    # diffusers' own converter brings every SGM name back to the module it came from: the SGM table is right.
    assert set(converted) == set(state)
    return {k.removeprefix("model.diffusion_model.").rsplit(".", 1)[0] for k in sgm_state}


def _up_attention(unet) -> frozenset[int]:
    return frozenset(i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn"))


def _linear_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_sd15_every_key_names_an_a1111_and_comfyui_module(tmp_path):
    unet, (text_encoder,) = _build(SD15_UNET, CLIP_L)
    adapter = make_adapter(unet, text_encoder, rank=1, unet_targets=None, te_targets=None, size_one=True)
    keys, path = _kohya_keys(tmp_path, adapter)
    unet_modules, te_modules = _linear_names(unet), _linear_names(text_encoder)
    assert len(keys) == len(unet_modules) + len(te_modules) > 300

    # ComfyUI: lora_unet_<diffusers path> for every UNet weight, lora_te_text_model_encoder_layers_N_<LORA_CLIP_MAP>
    comfy_clip_map = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                      "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                      "self_attn.out_proj": "self_attn_out_proj"}
    comfy = {"lora_unet_" + n.replace(".", "_") for n in unet_modules}
    comfy |= {f"lora_te_text_model_encoder_layers_{b}_{v}" for b in range(12) for k, v in comfy_clip_map.items()
              if f"encoder.layers.{b}.{k}" in te_modules}
    assert keys - comfy == set()

    # AUTOMATIC1111: the compvis name of each key is a module of its LDM UNet / transformers-4 CLIP
    compvis = {"diffusion_model_" + n.replace(".", "_") for n in _ldm_names(unet)}
    compvis |= {"transformer_text_model_" + n.replace(".", "_") for n in te_modules}
    assert {k for k in keys if _a1111_compvis(k) not in compvis} == set()

    # and the file reads back onto exactly these modules
    read = formats.read_adapter(path)
    assert set(read.shapes["unet"].target_modules) == unet_modules
    assert set(read.shapes["text_encoder"].target_modules) == te_modules


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_sdxl_kohya_names_te1_te2_and_sgm_unet(tmp_path, targets):
    unet, (te1, te2) = _sdxl()
    unet_targets = None if targets == "all" else ("to_q", "to_k", "to_v", "to_out.0")
    te_targets = None if targets == "all" else ("q_proj", "k_proj", "v_proj", "out_proj")
    adapter = make_adapter(unet, te1, text_encoder_2=te2, rank=1, unet_targets=unet_targets, te_targets=te_targets,
                           family="sdxl", size_one=True)
    keys, path = _kohya_keys(tmp_path, adapter)
    by_prefix = {p: {k for k in keys if k.startswith(p)} for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert sum(map(len, by_prefix.values())) == len(keys)
    assert not any(k.startswith("lora_te_") for k in keys)

    # sd-scripts / ComfyUI / A1111 name SDXL UNet modules by their SGM path
    sgm_names = {"lora_unet_" + n.replace(".", "_") for n in _ldm_names(unet)}
    assert by_prefix["lora_unet_"] - sgm_names == set()
    assert not any(p in k for k in by_prefix["lora_unet_"] for p in ("down_blocks", "up_blocks", "mid_block"))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in keys
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_k" in keys

    # te1 = CLIP-L, te2 = OpenCLIP-G, both `text_model_...` (ComfyUI clip_l / clip_g maps)
    te1_names = {"lora_te1_text_model_" + n.replace(".", "_") for n in _linear_names(te1)}
    te2_names = {"lora_te2_" + n.replace(".", "_") for n in _linear_names(te2)}
    assert by_prefix["lora_te1_"] - te1_names == set() and by_prefix["lora_te2_"] - te2_names == set()
    # A1111 applies an OpenCLIP text-encoder LoRA only when q, k, v and out_proj are all there
    for layer in range(32):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{proj}" in keys

    read = formats.read_adapter(path)
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        assert read.shapes[component].target_modules == adapter.shapes[component].target_modules, component
        assert set(read.shapes[component].target_modules) <= {n for n, _ in model.named_modules()}


def test_sdxl_file_loads_through_diffusers_sgm_reader(tmp_path):
    """diffusers' own SDXL loader maps our SGM-named file back onto the diffusers modules we started from."""
    from diffusers import StableDiffusionXLPipeline

    unet, (te1, te2) = _sdxl()
    adapter = make_adapter(unet, te1, text_encoder_2=te2, rank=1, family="sdxl", size_one=True)
    _, path = _kohya_keys(tmp_path, adapter)
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    assert len(converted) == 2 * sum(len(s.target_modules) for s in adapter.shapes.values())
    # diffusers returns its legacy spelling (`attn1.processor.to_q_lora.up.weight`, `self_attn.to_q_lora...`)
    got = set()
    for key in converted:
        key = re.sub(r"(_lora)?\.(lora(_linear_layer)?\.)?(up|down)\.weight$", "", key).replace(".processor", "")
        key = re.sub(r"self_attn\.to_(q|k|v|out)$", lambda m: f"self_attn.{m[1]}_proj", key)
        key = key.replace("text_encoder.text_model.", "text_encoder.")  # CLIPTextModel paths, transformers 5
        got.add(re.sub(r"\.to_out$", ".to_out.0", key))
    want = {f"{c}.{m}" for c, s in adapter.shapes.items() for m in s.target_modules}
    assert got == want


def test_sgm_mapping_reads_diffusers_paths_unchanged():
    assert ldm.from_sgm("down_blocks.1.attentions.0.proj_in") == "down_blocks.1.attentions.0.proj_in"
    assert kohya.parse_module_name("lora_unet_input_blocks_4_1_proj_in") == ("unet", "down_blocks.1.attentions.0.proj_in")
    assert kohya.parse_module_name("lora_unet_down_blocks_1_attentions_0_proj_in") == (
        "unet", "down_blocks.1.attentions.0.proj_in")
    assert kohya.parse_module_name("lora_te1_text_model_encoder_layers_3_mlp_fc2") == (
        "text_encoder", "encoder.layers.3.mlp.fc2")


def _as_type(adapter, kind: str):
    """The same modules as a DoRA / LoHa / LoKr adapter: size-one tensors under each type's peft names (names are
    what these tests check; tests/formats/test_lycoris_write.py checks the numbers)."""
    from sdlora.formats.adapter import AdapterFile
    from sdlora.models.lora import AdapterShape

    parts = {"dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
             "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
             "lokr": ("lokr_w1", "lokr_w2_a", "lokr_w2_b")}[kind]
    tensors = {c: {f"{m}.{p}": torch.ones(1, 1) for m in s.target_modules for p in parts}
               for c, s in adapter.shapes.items()}
    shapes = {c: AdapterShape(s.rank, s.alpha, s.target_modules, kind=kind) for c, s in adapter.shapes.items()}
    return AdapterFile(tensors, shapes, dict(adapter.metadata))


def _lycoris_names(tmp_path, adapter, kind):
    from sdlora.formats import lycoris_write

    path = lycoris_write.save_lycoris(tmp_path / f"{kind}.safetensors", _as_type(adapter, kind))
    with safe_open(str(path), framework="pt") as handle:
        return {key.partition(".")[0] for key in handle.keys()}


def test_lycoris_types_use_the_same_a1111_and_comfyui_names(tmp_path):
    """DoRA / LoHa / LoKr files name every SD1.5 and SDXL module (attention, ResNet convolutions, text encoders)
    exactly as the kohya LoRA file does, so the maps checked above hold for them too."""
    unet, (text_encoder,) = _build(SD15_UNET, CLIP_L)
    sd15 = make_adapter(unet, text_encoder, rank=1, unet_targets=None, te_targets=None, size_one=True)
    unet, (te1, te2) = _sdxl()
    sdxl = make_adapter(unet, te1, text_encoder_2=te2, rank=1, unet_targets=None, te_targets=None, family="sdxl",
                        size_one=True)
    sd15_names, sdxl_names = _kohya_keys(tmp_path, sd15)[0], _kohya_keys(tmp_path, sdxl)[0]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in sd15_names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in sdxl_names  # SGM name of down_blocks.0.resnets.0.conv1
    for kind in ("dora", "loha", "lokr"):
        assert _lycoris_names(tmp_path, sd15, kind) == sd15_names, kind
        assert _lycoris_names(tmp_path, sdxl, kind) == sdxl_names, kind

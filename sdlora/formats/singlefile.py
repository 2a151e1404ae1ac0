"""Write a base model as one original-layout (LDM) `.safetensors` checkpoint, the file AUTOMATIC1111, Forge and
ComfyUI load and that diffusers reads back with `from_single_file`.

Key layout (SD1/SD2): UNet under `model.diffusion_model.` (input_blocks / middle_block / output_blocks, named by
`ldm.to_sgm`, the map kohya's SDXL names use too), VAE under
`first_stage_model.` (encoder.down / decoder.up, reversed order), CLIP under `cond_stage_model.transformer.`.
The mapping is the inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`, which the
tests use as the oracle; it is driven by the model configs, so tiny models and SD1.5 map the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdlora.config.names import public_name
from sdlora.errors import UserError
from sdlora.files.atomic import save_safetensors_atomic
from sdlora.formats import ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileError(UserError, ValueError):
    """A weight with no place in the original layout (an architecture this exporter does not know)."""


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """UNet weights under their LDM names: the one diffusers <-> SGM/LDM map, `ldm.to_sgm`."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileError("per-block layer counts are not supported by the original layout exporter")
    attention = ldm.up_attention(state)
    out = {}
    for key, value in state.items():
        try:
            out[UNET_PREFIX + ldm.to_sgm(key, up_attention_blocks=attention, layers_per_block=layers)] = value
        except ldm.LayoutError:
            raise SingleFileError(f"UNet weight {key} has no original-layout name") from None
    return out


def _vae_key(key: str, num_up: int) -> str:
    module, _, param = key.rpartition(".")
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{ldm.rename_prefix(m[2], _VAE_ATTENTION)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise SingleFileError(f"VAE weight {key} has no original-layout name")


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = _vae_key(key, num_up)
        # The original VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5 drops the `text_model.` level from CLIPTextModel's own keys; the original layout keeps it.
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def to_ldm_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise SingleFileError("SDXL single-file export is not supported yet (two text encoders, SGM layout)")
    tensors = {}
    tensors.update(unet_to_ldm(unet.state_dict(), unet.config))
    tensors.update(vae_to_ldm(vae.state_dict(), vae.config))
    tensors.update(clip_to_ldm(text_encoder.state_dict()))
    return tensors


def save_single_file(base, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `base` (a `models.BaseModel`) as one original-layout safetensors file. Atomic."""
    try:
        tensors = to_ldm_checkpoint(base.unet, base.vae, base.text_encoder)
    except SingleFileError as exc:
        raise SingleFileError(f"{path}: cannot write {base.source} as one original-layout file: {exc}; "
                              "give an output name without .safetensors to get a diffusers folder") from None
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    # The file is made to be shared: the base is named by hub id or built-in name, a local one by its final name.
    save_safetensors_atomic(tensors, path, {"format": "pt", "sdlora.source": public_name(str(base.source))})
    return Path(path)

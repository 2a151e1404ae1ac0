"""SD3 / SD3.5 single files in Stability's original layout (`model.diffusion_model.joint_blocks.N...`, the VAE under
`first_stage_model.`), as `sd3_medium.safetensors` ships and diffusers' `from_single_file` reads them.

The mapping is the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: the original fuses each
stream's q, k and v into one `qkv` matrix, names the image stream `x_block` and the text stream `context_block`,
and stores the last adaLN modulations as (shift, scale) where diffusers keeps (scale, shift).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.config.names import public_name
from sdlora.files.atomic import save_safetensors_atomic
from sdlora.formats.singlefile import SingleFileError, vae_to_ldm

PREFIX = "model.diffusion_model."

_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_FUSED = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel` state dict in the original MMDiT key layout (without the file prefix)."""
    state = dict(state)
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
        for ours, theirs in _TOP.items():
            out[f"{theirs}.{param}"] = state.pop(f"{ours}.{param}")
        for i in range(num_layers):
            block = f"transformer_blocks.{i}."
            for stream, fused in _FUSED.items():
                parts = [f"{block}{stream}{x}.{param}" for x in (("q", "k", "v") if stream != "attn.add_"
                                                                  else ("q_proj", "k_proj", "v_proj"))]
                if parts[0] in state:
                    out[f"joint_blocks.{i}.{fused}.{param}"] = torch.cat([state.pop(p) for p in parts], dim=0)
            for ours, theirs in _BLOCK.items():
                key = f"{block}{ours}.{param}"
                if key in state:
                    value = state.pop(key)
                    # The last block's text stream keeps only (shift, scale): stored swapped, as norm_out.
                    last_context = i == num_layers - 1 and ours == "norm1_context.linear"
                    out[f"joint_blocks.{i}.{theirs}.{param}"] = _swap_halves(value) if last_context else value
    if state:
        raise SingleFileError(f"SD3 transformer weights without an original-layout name: {sorted(state)[:5]}")
    return {PREFIX + key: value for key, value in out.items()}


def save_sd3_single_file(base, path: str | Path) -> Path:
    """Write an SD3 base's transformer and VAE as one original-layout file, as `sd3_medium.safetensors` ships (the
    text encoders stay out: diffusers then loads them from the config folder). Atomic."""
    tensors = transformer_to_original(base.unet.state_dict(), base.unet.config.num_layers)
    tensors.update(vae_to_ldm(base.vae.state_dict(), base.vae.config))
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_safetensors_atomic(tensors, path, {"format": "pt", "sdlora.source": public_name(str(base.source))})
    return Path(path)

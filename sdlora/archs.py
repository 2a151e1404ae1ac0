"""Full-size Stable Diffusion shapes with random weights, built from diffusers' and transformers' own config classes.

For benchmarks: the compute and memory of a step depend on the shapes, not on the weight values, so an SD1.5-shaped
model with random weights measures what the real one would, with nothing downloaded. The tokenizer is the
project-made one from `tiny.py` (its ids all fall inside CLIP-L's 49408-token embedding).
"""

from __future__ import annotations

import torch

from sdlora.models import BaseModel, freeze

# SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json) and CLIP ViT-L/14 text encoder.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)
# A small model of the same layout, for smoke tests of the benchmark itself.
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=32)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32)

ARCHS = {"sd15": (SD15_UNET, SD15_VAE, CLIP_L), "tiny": (TINY_UNET, TINY_VAE, TINY_CLIP)}


def sd_scheduler():
    """SD1.5's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )


def build_random_base(arch: str = "sd15", seed: int = 0) -> BaseModel:
    """A frozen BaseModel of the named architecture with seeded random weights (fp32, on the CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.tiny import make_tokenizer

    if arch not in ARCHS:
        raise ValueError(
            f"--arch {arch!r}: choose one of {', '.join(ARCHS)} (SDXL needs SDXL training support in the loop "
            "first: its UNet also takes pooled text embeddings and time ids)"
        )
    unet_config, vae_config, text_config = ARCHS[arch]
    tokenizer = make_tokenizer(max_length=text_config["max_position_embeddings"])
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **text_config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    base = BaseModel(
        unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**vae_config), text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler=sd_scheduler(), source=f"random:{arch}",
    )
    freeze(base)
    return base

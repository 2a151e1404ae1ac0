"""Full-size Stable Diffusion shapes with random weights, built from diffusers' and transformers' own config classes.

For benchmarks: the compute and memory of a step depend on the shapes, not on the weight values, so an SD1.5-shaped
model with random weights measures what the real one would, with nothing downloaded. The tokenizer is the
project-made one from `tiny.py` (its ids all fall inside CLIP-L's 49408-token embedding).
"""

from __future__ import annotations

import contextlib

import torch

from sdlora.models import BaseModel, families, freeze

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

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): no attention at the top level, 1/2/10
# transformer layers below it, conditioned on CLIP-L and OpenCLIP-bigG states concatenated (768 + 1280 = 2048) plus
# bigG's pooled projection and six size/crop time ids (6 x 256 + 1280 = 2816).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
)
TINY_SDXL_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                      attention_head_dim=(2, 4, 4), cross_attention_dim=96, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 64)
TINY_CLIP_2 = dict(CLIP_BIGG, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                   projection_dim=64)

# arch: (unet, vae, text encoder, second text encoder or None)
ARCHS = {
    "sd15": (SD15_UNET, SD15_VAE, CLIP_L, None),
    "sdxl": (SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_BIGG),
    "tiny": (TINY_UNET, TINY_VAE, TINY_CLIP, None),
    "tiny-sdxl": (TINY_SDXL_UNET, TINY_VAE, TINY_CLIP, TINY_CLIP_2),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_base(arch: str = "sd15", seed: int = 0, frozen_dtype: torch.dtype = torch.float32,
                      init_device: str | torch.device | None = None) -> BaseModel:
    """A frozen BaseModel of the named architecture with seeded random weights on the CPU: the VAE in fp32, the UNet
    and text encoders created directly in `frozen_dtype`, as `load_base_model(frozen_dtype=...)` would load them.

    `init_device` (e.g. "cuda"): draw the random weights there and then move them to the CPU, so the model arrives
    exactly as from disk. Drawing SDXL's 3.5 B weights on one CPU core takes about a minute; on a GPU, a second."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.models.tiny import make_tokenizer

    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    unet_config, vae_config, text_config, text_config_2 = ARCHS[arch]
    length = text_config["max_position_embeddings"]
    tokenizer = make_tokenizer(max_length=length)
    torch.manual_seed(seed)

    def text_model(config: dict, tok, cls):
        return cls(CLIPTextConfig(**config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id))

    def on_init_device():
        return torch.device(init_device) if init_device is not None else contextlib.nullcontext()

    with _default_dtype(frozen_dtype), on_init_device():
        text_encoder = text_model(text_config, tokenizer, CLIPTextModel)
        extra = {}
        if text_config_2 is not None:  # SDXL: bigG with the projection that gives the pooled embedding
            tokenizer_2 = make_tokenizer(max_length=length, pad_token="!")
            extra = {"tokenizer_2": tokenizer_2,
                     "text_encoder_2": text_model(text_config_2, tokenizer_2, CLIPTextModelWithProjection)}
        unet = UNet2DConditionModel(**unet_config)
    with on_init_device():
        vae = AutoencoderKL(**vae_config)
    if init_device is not None:
        for module in (unet, vae, text_encoder, *(m for m in extra.values() if isinstance(m, torch.nn.Module))):
            module.to("cpu")
        if torch.device(init_device).type == "cuda":
            torch.cuda.empty_cache()
    base = BaseModel(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler=families.noise_scheduler(), source=f"random:{arch}", **extra,
    )
    freeze(base)
    return base

"""Full-size Stable Diffusion shapes with random weights, built from diffusers' and transformers' own config classes.

For benchmarks: the compute and memory of a step depend on the shapes, not on the weight values, so an SD1.5-shaped
model with random weights measures what the real one would, with nothing downloaded. The tokenizer is the
project-made one from `tiny.py` (its ids all fall inside CLIP-L's 49408-token embedding).
"""

from __future__ import annotations

import contextlib
import functools

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
                      init_device: str | torch.device | None = None, use_t5: bool = True) -> BaseModel:
    """A frozen BaseModel of the named architecture with seeded random weights on the CPU: the VAE in fp32, the UNet
    and text encoders created directly in `frozen_dtype`, as `load_base_model(frozen_dtype=...)` would load them.

    `init_device` (e.g. "cuda"): draw the random weights there and then move them to the CPU, so the model arrives
    exactly as from disk. Drawing SDXL's 3.5 B weights on one CPU core takes about a minute; on a GPU, a second."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.models.tiny import make_tokenizer

    if arch in SD3_TRAIN_ARCHS:
        return build_random_sd3_base(arch, seed, frozen_dtype, init_device, use_t5)
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: choose one of {', '.join([*ARCHS, *SD3_TRAIN_ARCHS])}")
    unet_config, vae_config, text_config, text_config_2 = ARCHS[arch]
    length = text_config["max_position_embeddings"]
    tokenizer = make_tokenizer(max_length=length)
    torch.manual_seed(seed)

    def text_model(config: dict, tok, cls):
        return cls(CLIPTextConfig(**config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id))

    with _default_dtype(frozen_dtype), _on(init_device):
        text_encoder = text_model(text_config, tokenizer, CLIPTextModel)
        extra = {}
        if text_config_2 is not None:  # SDXL: bigG with the projection that gives the pooled embedding
            tokenizer_2 = make_tokenizer(max_length=length, pad_token="!")
            extra = {"tokenizer_2": tokenizer_2,
                     "text_encoder_2": text_model(text_config_2, tokenizer_2, CLIPTextModelWithProjection)}
        unet = UNet2DConditionModel(**unet_config)
    with _on(init_device):
        vae = AutoencoderKL(**vae_config)
    _to_host(init_device, unet, vae, text_encoder, *extra.values())
    base = BaseModel(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler=families.noise_scheduler(), source=f"random:{arch}", **extra,
    )
    freeze(base)
    return base


def _on(init_device):
    return torch.device(init_device) if init_device is not None else contextlib.nullcontext()


def _to_host(init_device, *modules) -> None:
    """Weights drawn on an accelerator go to the CPU, where a loaded checkpoint arrives (meta ones stay shapes)."""
    if init_device is None or torch.device(init_device).type == "meta":
        return
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to("cpu")
    if torch.device(init_device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium, -3.5-large;
# Large Turbo shares Large's). Counted on the meta device: the shapes, never the 16 GB of weights.

SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
# MMDiT-X: the first 13 blocks add a second (image-only) self-attention; a larger position table for 1440 px.
SD35_MEDIUM_TRANSFORMER = dict(SD35_LARGE_TRANSFORMER, num_layers=24, num_attention_heads=24,
                               caption_projection_dim=1536, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)))
SD3_MEDIUM_TRANSFORMER = dict(SD35_MEDIUM_TRANSFORMER, pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)
SD3_VAE = dict(SD15_VAE, sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
SD3_ARCHS = {
    "sd3-medium": SD3_MEDIUM_TRANSFORMER,
    "sd3.5-medium": SD35_MEDIUM_TRANSFORMER,
    "sd3.5-large": SD35_LARGE_TRANSFORMER,
}


def sd3_shapes(arch: str, lora_rank: int = 16) -> dict[str, int]:
    """Parameter counts of an SD3 base's parts, built on the meta device: the transformer's trainable-shaped
    parameters, its stored position table (a buffer in diffusers, a tensor in the checkpoint: the published "8.1 B"
    and "2.5 B" count it), the three text encoders, the VAE, and a LoRA of `lora_rank` on the default targets."""
    from diffusers import SD3Transformer2DModel

    from sdlora.config import LoraSection
    from sdlora.models import lora

    if arch not in SD3_ARCHS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(SD3_ARCHS)}")

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD3_ARCHS[arch])
        shapes = {"transformer": count(transformer),
                  "transformer_pos_embed": sum(b.numel() for b in transformer.buffers()), **_sd3_encoder_shapes()}
        targets = LoraSection().transformer_targets
        lora.attach(transformer, lora.AdapterShape(lora_rank, float(lora_rank), targets))
        shapes[f"lora_rank{lora_rank}"] = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return shapes


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=1)
def _sd3_encoder_shapes() -> dict[str, int]:
    """The parts every SD3 size shares: CLIP-L and OpenCLIP-bigG with projections, T5-XXL's encoder, the VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "text_encoder": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2": count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))),
            "text_encoder_3": count(T5EncoderModel(T5Config(**T5_XXL))),
            "vae": count(AutoencoderKL(**SD3_VAE)),
        }


# A small model of SD3.5 Medium's layout (MMDiT-X dual attention in its first block, qk RMS norm), for smoke tests of
# the bench: both CLIPs' states (32 + 64) are zero-padded to the T5 width, their pooled projections give 96.
TINY_SD3_TRANSFORMER = dict(SD35_MEDIUM_TRANSFORMER, sample_size=8, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=32,
                            pooled_projection_dim=96, pos_embed_max_size=32, dual_attention_layers=(0,))
TINY_T5 = dict(T5_XXL, d_model=128, d_kv=16, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TINY_SD3_VAE = dict(SD3_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
# arch: (transformer, vae, CLIP-L, OpenCLIP-bigG, T5): what `scripts/bench.py --arch` trains for the SD3 family.
SD3_TRAIN_ARCHS = {
    "sd3-medium": (SD3_MEDIUM_TRANSFORMER, SD3_VAE, CLIP_L, CLIP_BIGG, T5_XXL),
    "sd3.5-medium": (SD35_MEDIUM_TRANSFORMER, SD3_VAE, CLIP_L, CLIP_BIGG, T5_XXL),
    "sd3.5-large": (SD35_LARGE_TRANSFORMER, SD3_VAE, CLIP_L, CLIP_BIGG, T5_XXL),
    "tiny-sd3": (TINY_SD3_TRANSFORMER, TINY_SD3_VAE, TINY_CLIP, TINY_CLIP_2, TINY_T5),
}


def build_random_sd3_base(arch: str, seed: int = 0, frozen_dtype: torch.dtype = torch.float32,
                          init_device: str | torch.device | None = None, use_t5: bool = True) -> BaseModel:
    """An SD3-family BaseModel with seeded random weights, as `build_random_base` builds the UNet families: the
    transformer and the three text encoders in `frozen_dtype` (T5-XXL left out with `use_t5=False`, as
    `model.t5=false` loads it), the 16-channel VAE in fp32, SD3's flow-matching scheduler. `init_device="meta"`
    builds the shapes only (parameter counts, no memory)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdlora.models.tiny import make_tokenizer
    from sdlora.models.tiny_sd3 import SD3_SCHEDULER, make_t5_tokenizer

    transformer_config, vae_config, clip_l, clip_g, t5 = SD3_TRAIN_ARCHS[arch]
    length = clip_l["max_position_embeddings"]
    tokenizers = [make_tokenizer(max_length=length), make_tokenizer(max_length=length, pad_token="!")]
    tokenizer_3 = make_t5_tokenizer() if use_t5 else None  # its ids all fall inside T5's 32128-token embedding
    torch.manual_seed(seed)

    def clip(config: dict, tok):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            **config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    with _default_dtype(frozen_dtype), _on(init_device):
        text_encoder, text_encoder_2 = clip(clip_l, tokenizers[0]), clip(clip_g, tokenizers[1])
        text_encoder_3 = T5EncoderModel(T5Config(**t5, pad_token_id=tokenizer_3.pad_token_id,
                                                 eos_token_id=tokenizer_3.eos_token_id)) if use_t5 else None
        transformer = SD3Transformer2DModel(**transformer_config)
    with _on(init_device):
        vae = AutoencoderKL(**vae_config)
    _to_host(init_device, transformer, vae, text_encoder, text_encoder_2, text_encoder_3)
    base = BaseModel(
        unet=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizers[0],
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), source=f"random:{arch}",
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizers[1], text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    freeze(base)
    return base

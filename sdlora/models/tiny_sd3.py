"""A tiny SD3-shaped pipeline (`sdlora:tiny-sd3`): the real diffusers / transformers classes of SD3, only small.

SD3Transformer2DModel (patch 2, two joint blocks), a 16-channel AutoencoderKL with SD3's scaling and shift and no
quant convs, two CLIPTextModelWithProjection (CLIP-L-like, and a wider OpenCLIP-bigG-like one), a T5EncoderModel and
the rectified-flow FlowMatchEulerDiscreteScheduler with SD3's shift of 3. The CLIP tokenizers are the byte-level BPE
the other tiny bases use; the T5 tokenizer is a SentencePiece-style unigram vocabulary sdlora makes from the same
word list (whole words as `▁word` pieces, single letters as the fallback). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.models.tiny import DEFAULT_WORDS, TinySpec, _text_config, _tiny_vae, make_tokenizer

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3 Medium's and SD3.5's scheduler config
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
T5_WIDTH = 96  # the joint attention width: T5's d_model, wider than the two CLIPs' states together (32 + 48)


def make_t5_tokenizer(words=DEFAULT_WORDS):
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(w.lower() for w in words)]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_sd3_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = make_tokenizer(spec.words, spec.max_length)
    tokenizer_2 = make_tokenizer(spec.words, spec.max_length, pad_token="!")
    tokenizer_3 = make_t5_tokenizer(spec.words)
    torch.manual_seed(seed)
    hidden_2 = spec.text_hidden + spec.text_hidden // 2  # bigG is wider than CLIP-L
    text_encoder = CLIPTextModelWithProjection(_text_config(spec, tokenizer, spec.text_hidden, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(spec, tokenizer_2, hidden_2, "gelu"))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
    ))
    heads, head_dim = 4, 8
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size // 2 ** (len(spec.vae_channels) - 1), patch_size=2, in_channels=16,
        out_channels=16, num_layers=2, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=spec.text_hidden + hidden_2, pos_embed_max_size=32,
    )
    vae = _tiny_vae(TinySpec(vae_channels=spec.vae_channels, latent_channels=16, sample_size=spec.sample_size),
                    **SD3_VAE)
    return {
        "transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3,
    }


def save_tiny_sd3_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline in diffusers layout (transformer, text_encoder_3 and tokenizer_3 folders)."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    StableDiffusion3Pipeline(**build_tiny_sd3_components(spec, seed)).save_pretrained(path, safe_serialization=True)
    return path

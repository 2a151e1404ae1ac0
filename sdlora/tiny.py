"""Tiny SD1.5-shaped pipelines built from small configs: the base for tests and the offline demo.

Nothing here is downloaded. The tokenizer is a CLIP byte-level BPE whose vocabulary and merges sdlora makes
itself from a word list, so any text tokenizes (unknown words fall back to characters) and the words the demo
uses become single tokens. The components are the same diffusers / transformers classes as SD1.5, only smaller,
so every code path (LoRA targets, file formats, diffusers loading) is the real one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_WORDS = tuple(
    (
        "a an the of on in with and style photo painting drawing sketch picture image "
        "red green blue yellow white black orange purple pink grey brown cyan "
        "circle square triangle star ring shape shapes background striped stripes dotted outline thick thin "
        "large small big tiny left right top bottom center sks cat dog person face tree house"
    ).split()
)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable characters standing for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return tuple(chr(c) for c in codes)


def make_clip_bpe(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a CLIP BPE tokenizer in which each of `words` is one token."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_tokenizer(words=DEFAULT_WORDS, max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = make_clip_bpe(tuple(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD1.5-shaped model. Defaults: ~0.5 M parameters, 64 px images -> 8x8 latents."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # four blocks: the SD downsampling factor of 8
    latent_channels: int = 4
    sample_size: int = 64
    prediction_type: str = "epsilon"
    words: tuple[str, ...] = DEFAULT_WORDS


def build_tiny_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler with seeded random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tokenizer(spec.words, spec.max_length)
    torch.manual_seed(seed)
    latent_size = spec.sample_size // 2 ** (len(spec.vae_channels) - 1)
    down = ("CrossAttnDownBlock2D",) * (len(spec.unet_channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(spec.unet_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=min(32, spec.unet_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 4,
            num_attention_heads=spec.text_heads,
            num_hidden_layers=spec.text_layers,
            max_position_embeddings=spec.max_length,
            projection_dim=spec.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD1.5's own scheduler settings, so timesteps, SNR and targets are the real ones.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=spec.prediction_type,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Build a tiny pipeline and save it in diffusers layout (model_index.json + one folder per component)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    parts = build_tiny_components(spec, seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path

"""Tiny SD1.5-, SD2-v- and SDXL-shaped pipelines from small configs: the base for tests and the offline demo.

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

from sdlora.models import families
from sdlora.models.base import pipeline_from_components

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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE makes of one word: repeatedly merge the adjacent pair with the lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def make_clip_bpe(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a CLIP BPE tokenizer in which each of `words` is one token.

    BPE applies merges by rank, not word by word: merges made for "red" (r+e first) would split "green" into
    g/re/e/n unless its own merges are chosen knowing that. So each word is first tokenized with the merges so far,
    and merges are added only for what is still split; later merges rank after earlier ones, so they never change
    how an earlier word tokenizes."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = _bpe(word, ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            ranks[(merged, piece)] = len(merges)
            merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def make_tokenizer(words=DEFAULT_WORDS, max_length: int = 77, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    vocab, merges = make_clip_bpe(tuple(words))
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, **extra)


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
    # SD2.x shapes: OpenCLIP-H's text encoder uses exact GELU and pads with "!", the UNet linear projections.
    text_hidden_act: str = "quick_gelu"
    pad_token: str | None = None
    use_linear_projection: bool = False


# SD2.1-768-v shaped: v-prediction, OpenCLIP-like text encoder (cross-attention width stays tiny).
SD2_V_SPEC = TinySpec(prediction_type="v_prediction", text_hidden_act="gelu", pad_token="!", use_linear_projection=True)


def _tiny_vae(spec, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.sample_size,
        **extra,
    )


def _tiny_unet(spec, down: tuple[str, ...], up: tuple[str, ...], cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=spec.sample_size // 2 ** (len(spec.vae_channels) - 1),  # the latent side
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=min(32, spec.unet_channels[0]),
        **extra,
    )


def build_tiny_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler with seeded random weights."""
    from transformers import CLIPTextModel

    tokenizer = make_tokenizer(spec.words, spec.max_length, spec.pad_token)
    torch.manual_seed(seed)
    down = ("CrossAttnDownBlock2D",) * (len(spec.unet_channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(spec.unet_channels) - 1)
    unet = _tiny_unet(spec, down, up, spec.text_hidden, use_linear_projection=spec.use_linear_projection)
    vae = _tiny_vae(spec)
    text_encoder = CLIPTextModel(_text_config(spec, tokenizer, spec.text_hidden, spec.text_hidden_act))
    # SD1.5's own scheduler settings, so timesteps, SNR and targets are the real ones.
    scheduler = families.noise_scheduler(spec.prediction_type)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _text_config(spec: TinySpec, tokenizer, hidden: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=spec.text_heads,
        num_hidden_layers=spec.text_layers,
        max_position_embeddings=spec.max_length,
        projection_dim=projection_dim or hidden,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Build a tiny pipeline and save it in diffusers layout (model_index.json + one folder per component)."""
    path = Path(path)
    pipeline_from_components(**build_tiny_components(spec, seed)).save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# SDXL-shaped: two text encoders (CLIP-L-like, and OpenCLIP-bigG-like with a projection for the pooled embedding),
# a UNet conditioned on both encoders' states concatenated plus pooled embedding and six size/crop time ids.

SDXL_TIME_EMBED_DIM = 8  # per time id; SDXL's is 256


def build_tiny_sdxl_components(spec: TinySpec = TinySpec(), seed: int = 0) -> dict:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tokenizer(spec.words, spec.max_length)
    tokenizer_2 = make_tokenizer(spec.words, spec.max_length, pad_token="!")
    torch.manual_seed(seed)
    hidden_2 = spec.text_hidden * 2  # bigG is wider than CLIP-L
    # SDXL's layout: no attention at the highest resolution, attention below it.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(spec.unet_channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(spec.unet_channels) - 1) + ("UpBlock2D",)
    unet = _tiny_unet(
        spec, down, up, spec.text_hidden + hidden_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # six time ids (original size, crop top-left, target size) plus encoder 2's pooled projection
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + spec.text_hidden,
    )
    vae = _tiny_vae(spec, scaling_factor=0.13025, force_upcast=True)  # SDXL's own VAE settings
    text_encoder = CLIPTextModel(_text_config(spec, tokenizer, spec.text_hidden, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(spec, tokenizer_2, hidden_2, "gelu", projection_dim=spec.text_hidden)
    )
    scheduler = EulerDiscreteScheduler(
        **families.NOISE_SCHEDULE, timestep_spacing="leading", prediction_type=spec.prediction_type
    )
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler,
    }


def save_tiny_sdxl_pipeline(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline in diffusers layout (text_encoder_2 / tokenizer_2 folders included)."""
    path = Path(path)
    pipeline_from_components(**build_tiny_sdxl_components(spec, seed)).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sd2v_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A tiny SD2.1-768-v shaped pipeline: v-prediction scheduler, OpenCLIP-like text encoder."""
    return save_tiny_pipeline(path, SD2_V_SPEC, seed)

"""The `model:` and `lora:` sections: which base is loaded, and which of its layers get an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from sdlora.config.section import Section


class ModelSection(Section):
    base: str = Field(
        "sdlora:tiny",
        description="Base model: a hub id, a local diffusers folder, a single .safetensors checkpoint, "
        "or a built-in name such as 'sdlora:tiny'.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `base` is a hub id.")
    variant: str | None = Field(None, description="Weights variant to load from a hub repo or folder, e.g. 'fp16'.")
    single_file_config: str | None = Field(
        None,
        description="Local diffusers folder (or hub id) whose configs describe a single-file checkpoint; "
        "needed offline, since diffusers otherwise fetches them.",
    )
    family: Literal["sd1", "sd2", "sd2-v", "sdxl", "sd3"] | None = Field(
        None,
        description="Stable Diffusion family of the base; default: detected from its components (or a single "
        "file's keys). 'sd2-v' also makes an SD2 single file predict v.",
    )
    allow_pickle: bool = Field(
        False,
        description="Allow a .ckpt/.pt/.bin single-file base (pickle). Loaded with torch.load(weights_only=True) "
        "only; off by default because a pickle file can run code.",
    )
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="Frozen-base quantization for QLoRA: int8 weight-only (optimum-quanto, CPU or GPU) or nf4 "
        "(bitsandbytes, CUDA). LoRA weights stay fp32; the adapter loads on the full-precision base.",
    )
    t5: bool = Field(
        True,
        description="SD3 only: load the T5-XXL text encoder (text_encoder_3). false drops it: its part of the prompt "
        "embedding is zeros, as in diffusers' pipeline with text_encoder_3=None, and ~9 GB (bf16) are never loaded.",
    )
    t5_max_length: int = Field(
        77, ge=1, le=512,
        description="SD3 only: tokens of the caption T5 reads in training (diffusers' script: 77; its pipeline "
        "generates with 256).",
    )


UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# SD3's joint attention: the image stream's projections and the text (context) stream's `add_*` ones.
SD3_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class LoraSection(Section):
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    unet_targets: tuple[str, ...] = Field(UNET_ATTENTION_TARGETS, description="UNet module names that get LoRA.")
    transformer_targets: tuple[str, ...] = Field(
        SD3_ATTENTION_TARGETS,
        description="SD3 transformer module names that get LoRA (joint attention; add 'ff.net.0.proj', "
        "'ff.net.2', 'ff_context.net.0.proj', 'ff_context.net.2' for the feed-forwards).",
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder.")
    text_encoder_targets: tuple[str, ...] = Field(
        TEXT_ENCODER_ATTENTION_TARGETS, description="Text-encoder module names that get LoRA."
    )
    init_from: Path | None = Field(
        None, description="Start the LoRA from this adapter file (diffusers or kohya layout, same rank, alpha and "
        "targets) instead of a fresh one; a new run with a fresh optimizer (to continue a stopped run, --resume)."
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @field_validator("unet_targets", "transformer_targets", "text_encoder_targets")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one module, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']")
        return value

"""The `model:` and `lora:` sections: which base is loaded, and which of its layers get an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

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


ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")
# Options that belong to one adapter type only, with their defaults: set on another type they would do nothing.
TYPE_OPTIONS = {"factor": ("lokr", -1), "decompose_both": ("lokr", False)}


class LoraSection(Section):
    type: Literal["lora", "dora", "loha", "lokr"] = Field(
        "lora",
        description="Adapter type, trained through peft: 'lora' (B @ A), 'dora' (LoRA with a learned magnitude per "
        "output, Liu et al. 2024), 'loha' (Hadamard product of two low-rank products, LyCORIS), 'lokr' (Kronecker "
        "product, LyCORIS). Files of dora/loha/lokr are written in the kohya/LyCORIS layout that ComfyUI, "
        "AUTOMATIC1111/Forge and LyCORIS read (docs/adapter-types.md).",
    )
    rank: int = Field(4, ge=1, description="LoRA rank r (LoHa: the rank of each of its two products; LoKr: the "
                      "rank of its decomposed factor).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch (lora and dora only).")
    conv_rank: int | None = Field(
        None, ge=1,
        description="LoCon: also adapt the UNet's ResNet, downsampler and upsampler convolutions at this rank "
        "(kohya's conv_dim). Default: convolutions are left alone.",
    )
    conv_alpha: float | None = Field(
        None, gt=0, description="Alpha of the convolution adapters (kohya's conv_alpha). Default: conv_rank.",
    )
    factor: int = Field(
        -1, description="LoKr only: the Kronecker factor each dimension is split by (-1: as square as the "
        "dimension allows; peft decompose_factor, LyCORIS factor).",
    )
    decompose_both: bool = Field(
        False, description="LoKr only: also decompose the smaller Kronecker factor into a low-rank product.",
    )
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

    @property
    def effective_conv_alpha(self) -> float | None:
        if self.conv_rank is None:
            return None
        return float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)

    @model_validator(mode="after")
    def _options_of_its_type(self) -> LoraSection:
        """An option of another adapter type would be silently ignored: refused, naming the field."""
        for name, (owner, default) in TYPE_OPTIONS.items():
            if self.type != owner and getattr(self, name) != default:
                raise ValueError(f"lora.{name} is a lora.type={owner} option and this adapter is "
                                 f"lora.type={self.type}; remove lora.{name} or set lora.type={owner}")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"lora.factor must be -1 (automatic) or a positive integer, got {self.factor}")
        if self.type in ("loha", "lokr") and self.dropout:
            raise ValueError(f"lora.dropout: peft's {self.type} has no dropout on its branch; remove lora.dropout "
                             "(it applies to lora.type=lora and dora)")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("lora.conv_alpha needs lora.conv_rank (the convolutions get an adapter only with a "
                             "conv rank); set lora.conv_rank or remove lora.conv_alpha")
        if self.init_from is not None and (self.type != "lora" or self.conv_rank is not None):
            raise ValueError(f"lora.init_from: starting from a file works for plain LoRA only (this run is "
                             f"lora.type={self.type}{' with lora.conv_rank' if self.conv_rank else ''}); remove "
                             "lora.init_from")
        return self

    @field_validator("unet_targets", "transformer_targets", "text_encoder_targets")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one module, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']")
        return value

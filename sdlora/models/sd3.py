"""Stable Diffusion 3 / 3.5: what the MMDiT family needs beside the UNet families, in one place.

- **The base**: an `SD3Transformer2DModel` (held in `BaseModel.unet`, the slot every family's denoiser uses, so
  quantizing, storing, placing and the loop treat it as they treat a UNet), a 16-channel VAE with a shift factor,
  two CLIP text encoders with projection (CLIP-L, OpenCLIP-bigG) and an optional T5-XXL encoder, and the
  rectified-flow `FlowMatchEulerDiscreteScheduler`.
- **Conditioning** (Esser et al., "Scaling Rectified Flow Transformers", 2024, sec. 5.1; diffusers'
  `StableDiffusion3Pipeline.encode_prompt`): both CLIPs' penultimate states concatenated and zero-padded to the T5
  width, then T5's last state (or zeros when T5 is dropped, as the pipeline does with `text_encoder_3=None`)
  appended along the sequence; the two pooled projections concatenated go to `pooled_projections`.
- **Adapter files** name the transformer `transformer.` (diffusers' SD3 layout, which ComfyUI also reads).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdlora.config import ConfigError

COMPONENT = "transformer"  # the denoiser's prefix in an SD3 adapter file
T5_COMPONENT = "text_encoder_3"  # never trained (sdlora, like diffusers' script, trains only the CLIPs)


def is_sd3_config(denoiser_config) -> bool:
    """An SD3 MMDiT config: joint attention over text and image tokens."""
    return "joint_attention_dim" in denoiser_config and "pooled_projection_dim" in denoiser_config


def pipeline(base, scheduler=None):
    """`StableDiffusion3Pipeline` over the base's own modules (no copy of the weights)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=base.unet, scheduler=scheduler or base.scheduler, vae=base.vae,
        text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        text_encoder_3=base.text_encoder_3, tokenizer_3=base.tokenizer_3,
    )


def base_from_pipeline(pipe, source: str):
    """A `BaseModel` over a loaded `StableDiffusion3Pipeline` (single files)."""
    from sdlora.models.base import BaseModel

    return BaseModel(
        unet=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler, source=source, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
        text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3,
    )


def load_folder(source: str, common: dict, weights: dict, torch_dtype, frozen_dtype, use_t5: bool = True):
    """The parts of a diffusers SD3 folder or hub repo; T5 (the largest part, ~4.7 B parameters) only when used."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from sdlora.models.base import BaseModel

    def clip(index: str):
        return CLIPTextModelWithProjection.from_pretrained(source, subfolder=f"text_encoder{index}",
                                                           dtype=frozen_dtype, **weights)

    parts: dict[str, Any] = {
        "unet": SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=frozen_dtype,
                                                      **weights),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **weights),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **common),
        "text_encoder": clip(""), "text_encoder_2": clip("_2"),
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
    }
    if use_t5:
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3",
                                                                 dtype=frozen_dtype, **weights)
        parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **common)
    return BaseModel(source=source, **parts)


def text_encoders_for_single_file(path: Path, config: str | None, torch_dtype, use_t5: bool) -> dict[str, Any]:
    """The text encoders a single file lacks, from its config folder. `sd3_medium.safetensors` and the SD3.5 files
    ship the transformer and VAE only; diffusers' `from_single_file` then wants each encoder passed in."""
    from safetensors import safe_open

    parts: dict[str, Any] = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    if path.suffix != ".safetensors" or config is None or not Path(config).is_dir():
        return parts
    with safe_open(str(path), framework="pt") as handle:
        if any(key.startswith("text_encoders.") for key in handle.keys()):
            return parts
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    def clip(subfolder: str):
        return CLIPTextModelWithProjection.from_pretrained(config, subfolder=subfolder, dtype=torch_dtype)

    parts.update({
        "text_encoder": clip("text_encoder"), "text_encoder_2": clip("text_encoder_2"),
        "tokenizer": CLIPTokenizer.from_pretrained(config, subfolder="tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(config, subfolder="tokenizer_2"),
    })
    if use_t5:
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(config, subfolder="text_encoder_3", dtype=torch_dtype)
        parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(config, subfolder="tokenizer_3")
    return parts


def is_sd3_folder(source: str) -> bool:
    return (Path(source) / "transformer" / "config.json").is_file() and is_sd3_config(
        _json(Path(source) / "transformer" / "config.json"))


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Training: what flow matching refuses, and the conditioning


def check_training(config) -> str:
    """The run's target for an SD3 base ('flow'); refuses the levers that have no meaning for flow matching."""
    train = config.train
    refused = {
        "train.noise_offset": (train.noise_offset, "offset noise is an epsilon-schedule fix; rectified flow "
                               "reaches pure noise at t=1 already"),
        "train.snr_gamma": (train.snr_gamma, "min-SNR weights a DDPM schedule; use flow.loss_weighting"),
        "train.zero_terminal_snr": (train.zero_terminal_snr, "rectified flow already ends at pure noise"),
        "train.prediction_type": (train.prediction_type, "SD3 predicts the flow velocity"),
        # Not applied by the flow loss yet: refused rather than silently ignored.
        "train.loss_type": (train.loss_type != "l2", "the flow loss is a weighted mean squared error"),
        "train.min_timestep": (train.min_timestep, "SD3 draws sigmas, set by flow.timestep_sampling"),
        "train.max_timestep": (train.max_timestep is not None, "SD3 draws sigmas, set by flow.timestep_sampling"),
        "data.masked_loss": (config.data.masked_loss, "masks are not applied to the flow loss yet"),
        "validation": (config.validation.enabled or bool(config.data.validation_sources()),
                       "the validation loss is scored with a noise schedule, not the flow objective, yet"),
    }
    for field, (value, why) in refused.items():
        if value:
            raise ConfigError(f"{field}: not used with an SD3 base ({why}); unset it (SD3 trains with the "
                              "flow: section)")
    if config.lora.unet_targets != type(config.lora)().unet_targets:
        raise ConfigError("lora.unet_targets: an SD3 base has a transformer, not a UNet; set lora.transformer_targets")
    if config.lora.type != "lora":
        raise ConfigError(f"lora.type: {config.lora.type} is not trained on SD3 bases (SD3 adapters are written in "
                          "diffusers layout, which has no LyCORIS types); set lora.type=lora")
    if config.lora.conv_rank is not None:
        raise ConfigError("lora.conv_rank: an SD3 base has no ResNet convolutions to adapt (its transformer is "
                          "linear layers); remove lora.conv_rank")
    if config.output.kohya:
        raise ConfigError("output.kohya: SD3 adapters are written in diffusers layout only (`transformer.` keys, "
                          "which diffusers and ComfyUI both load as they are); set output.kohya=false")
    return "flow"


def refuse_sd3_fields(config, family: str) -> None:
    """Options that only an SD3 base reads, changed from their defaults for another family: refused, never silently
    ignored. (Values, not which keys a file names: a run folder's config.yaml spells out every default.)"""
    set_fields = [f"{section}.{name}" for section, names in (("model", ("t5", "t5_max_length")),
                                                              ("lora", ("transformer_targets",)),
                                                              ("flow", tuple(type(config.flow).model_fields)))
                  for name in names
                  if getattr(getattr(config, section), name) != getattr(type(getattr(config, section))(), name)]
    if set_fields:
        raise ConfigError(f"{set_fields[0]}: only SD3 bases read it, and this base is {family}; remove "
                          f"{', '.join(set_fields)}")


@dataclass
class SD3Conditioning:
    """SD3 text conditioning; the same interface as `families.Conditioning` (`encode_text` is what a text cache
    stores, a batch carrying `cached_keys` skips the encoders)."""

    tokenizers: list[Any]  # CLIP-L, CLIP-G[, T5]
    text_encoders: list[torch.nn.Module]  # CLIP-L, CLIP-G[, T5]
    device: torch.device
    train_text_encoder: bool
    joint_attention_dim: int  # T5's width, and the zeros' width without T5
    t5_max_length: int

    cached_keys = ("encoder_hidden_states", "pooled_prompt_embeds")

    def _grad(self):
        return contextlib.nullcontext() if self.train_text_encoder else torch.no_grad()

    def _ids(self, tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        clip_length = self.tokenizers[0].model_max_length  # the pipeline tokenizes both CLIPs to encoder 1's length
        states, pooled = [], []
        with self._grad():
            for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
                out = encoder(self._ids(tokenizer, captions, clip_length), output_hidden_states=True)
                pooled.append(out[0])
                states.append(out.hidden_states[-2])
            clip = torch.cat(states, dim=-1)
            if len(self.text_encoders) > 2:
                with torch.no_grad():  # T5 is never trained
                    t5 = self.text_encoders[2](self._ids(self.tokenizers[2], captions, self.t5_max_length))[0]
            else:
                t5 = torch.zeros((len(captions), self.t5_max_length, self.joint_attention_dim), device=self.device,
                                 dtype=clip.dtype)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                    "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def text_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if all(key in batch for key in self.cached_keys):
            return {key: batch[key].to(self.device) for key in self.cached_keys}
        return self.encode_text(batch["captions"])

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text = self.text_outputs(batch)
        return text["encoder_hidden_states"], {"pooled_projections": text["pooled_prompt_embeds"]}


def conditioning(base, text_encoders, device, train_text_encoder: bool, t5_max_length: int) -> SD3Conditioning:
    return SD3Conditioning(base.tokenizers, list(text_encoders), device, train_text_encoder,
                           base.unet.config.joint_attention_dim, t5_max_length)

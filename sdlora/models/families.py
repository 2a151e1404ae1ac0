"""What differs between Stable Diffusion families, and nothing else: the family table (`TABLE`: names, what kohya
and modelspec call each family, target, resolution; every other module reads it), detection, text conditioning,
and the one noise schedule they share.

- **sd1**: one CLIP-L text encoder, its last hidden state conditions the UNet; epsilon target.
- **sd2** / **sd2-v**: one OpenCLIP-H text encoder (exact GELU, where OpenAI's CLIP uses quick-GELU), last hidden
  state; the 768 px models predict v (`sd2-v`).
- **sdxl**: two text encoders (CLIP-L, OpenCLIP-bigG); both encoders' penultimate hidden states are concatenated,
  the pooled projection of encoder 2 and six "time ids" (original size, crop top-left, target size; Podell et al.,
  "SDXL", 2023, sec. 2.2) go to the UNet as `added_cond_kwargs`.
- **sd3**: SD3 Medium, SD3.5 Medium / Large / Large Turbo: an MMDiT transformer trained by rectified flow on three
  text encoders (two CLIPs with projection, an optional T5); its conditioning lives in `sdlora.models.sd3`.

The training loop gets a `Conditioning` object and calls it on each batch; it never asks which family it trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdlora.config import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# The family table: the one place that says what each family is called, by sdlora and by other tools.


@dataclass(frozen=True)
class Family:
    """One row of the family table: sdlora's name and what other tools call the same base."""

    name: str  # `model.family`, the `sdlora.family` header
    base_model_version: str  # kohya's `ss_base_model_version`: A1111, ComfyUI and kohya's tools read it
    architecture: str  # modelspec's `architecture` of a LoRA on this base
    prediction_type: str  # the family's own target: epsilon, v for SD2's 768 px models, flow for SD3
    resolution: int  # the side its bases were trained at
    pipeline_class: str  # the diffusers pipeline that loads it
    hub_tag: str  # the Hub's tag for models of the family
    license: str  # its bases' license (SD1.x CreativeML OpenRAIL-M; SD2.x, SDXL Open RAIL++-M; SD3.5 the
    # Stability AI Community License, which the Hub names `other` with license_name `stabilityai-ai-community`)

    @property
    def sd2(self) -> bool:
        """kohya's `ss_v2`: an SD2.x base (OpenCLIP text encoder)."""
        return self.name.startswith("sd2")


TABLE: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "sd_v1", "stable-diffusion-v1/lora", "epsilon", 512, "StableDiffusionPipeline",
               "stable-diffusion", "creativeml-openrail-m"),
        Family("sd2", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon", 512, "StableDiffusionPipeline",
               "stable-diffusion", "openrail++"),
        Family("sd2-v", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v_prediction", 768, "StableDiffusionPipeline",
               "stable-diffusion", "openrail++"),
        Family("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "epsilon", 1024,
               "StableDiffusionXLPipeline", "stable-diffusion-xl", "openrail++"),
        # kohya's sd3 trainer and modelspec call the family "sd3" / "stable-diffusion-3" (sd-scripts appends the
        # size, e.g. "-m", when it knows it; the family row names them all).
        Family("sd3", "sd3", "stable-diffusion-3/lora", "flow", 1024, "StableDiffusion3Pipeline", "sd3",
               "stabilityai-ai-community"),
    )
}
FAMILIES = tuple(TABLE)
# Licenses the Hub has no identifier for: a card names them as `license: other` with `license_name` (how the SD3.5
# repos declare theirs).
OTHER_LICENSES = frozenset({"stabilityai-ai-community"})


def hub_license(name: str) -> dict[str, str]:
    """A model card's license fields for a license name."""
    return {"license": "other", "license_name": name} if name in OTHER_LICENSES else {"license": name}

# The training noise schedule every family shares: SD1.5's scheduler config (scaled-linear betas, 1000 steps).
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1}


def noise_scheduler(prediction_type: str = "epsilon"):
    """A DDPM scheduler with the shared schedule, for bases sdlora builds itself (tiny, benchmark, shapes)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False, prediction_type=prediction_type)


def detect_family(unet_config, text_encoder_config, prediction_type: str) -> str:
    """Family from the loaded components: SDXL conditions on time ids; SD2 has an OpenCLIP text encoder (1024-d
    states, exact GELU); SD2's 768 px models predict v."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    openclip = getattr(text_encoder_config, "hidden_act", None) == "gelu"
    if unet_config.get("cross_attention_dim") == 1024 or openclip:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


def family_from_checkpoint_keys(keys: Iterable[str]) -> str | None:
    """Family of a single-file (original Stability layout) checkpoint from its key names, or None if unknown.
    Whether an SD2 file predicts v is not in its weights: that comes from the config folder or `model.family`."""
    sd2 = sd1 = False
    for key in keys:
        if key.startswith("conditioner.embedders.1."):
            return "sdxl"
        if key.startswith("model.diffusion_model.joint_blocks."):  # SD3's MMDiT blocks
            return "sd3"
        sd2 = sd2 or key.startswith("cond_stage_model.model.")
        sd1 = sd1 or key.startswith("cond_stage_model.transformer.")
    return "sd2" if sd2 else "sd1" if sd1 else None


def adapter_metadata(family: str, prediction_type: str, resolution: int) -> dict[str, str]:
    """`ss_base_model_version`, `ss_v2` and `modelspec.*` fields naming the base family (all values strings)."""
    row = TABLE[family]
    return {
        "ss_base_model_version": row.base_model_version,
        "ss_v2": str(row.sd2),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": row.architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "flow"}.get(prediction_type, "epsilon"),
        "modelspec.resolution": f"{resolution}x{resolution}",
    }


def with_zero_terminal_snr(scheduler, prediction_type: str):
    """The same schedule rescaled so the last timestep is pure noise (Lin et al., "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", 2024): fixes washed-out very dark / bright images. Only for v-prediction: at
    zero SNR an epsilon target says nothing about the image."""
    if prediction_type != "v_prediction":
        raise ConfigError(
            "train.zero_terminal_snr: needs a v-prediction model (SD2.x 768-v) or train.prediction_type=v_prediction;"
            f" this run predicts {prediction_type}: set train.zero_terminal_snr=false or train a v-prediction base"
        )
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: batch -> (encoder_hidden_states, added_cond_kwargs or None)


def add_time_ids(batch: dict[str, Any], device=None) -> torch.Tensor:
    """[B, 6] SDXL size conditioning: original (h, w), crop top-left (top, left), target (h, w), per image."""
    rows = [
        [*original, *crop, *target]
        for original, crop, target in zip(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


@dataclass
class Conditioning:
    """SD1 / SD2 text conditioning: the text encoder's last hidden state.

    `encode_text(captions)` is the encoder callable a text cache stores: it returns a dict of tensors, and a batch
    that carries those same keys skips the encoders (frozen encoders only: a cache of a trained encoder is stale).
    """

    tokenizers: Sequence[Any]
    text_encoders: Sequence[torch.nn.Module]
    device: torch.device
    train_text_encoder: bool = False

    cached_keys = ("encoder_hidden_states",)

    def _grad(self):
        return contextlib.nullcontext() if self.train_text_encoder else torch.no_grad()

    def _tokens(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with self._grad():
            tokens = self._tokens(self.tokenizers[0], captions)
            return {"encoder_hidden_states": self.text_encoders[0](tokens, return_dict=False)[0]}

    def text_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if all(key in batch for key in self.cached_keys):
            return {key: batch[key].to(self.device) for key in self.cached_keys}
        return self.encode_text(batch["captions"])

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return self.text_outputs(batch)["encoder_hidden_states"], None


@dataclass
class SDXLConditioning(Conditioning):
    """SDXL: both encoders' penultimate states concatenated; encoder 2's pooled projection and the time ids."""

    cached_keys = ("encoder_hidden_states", "pooled_prompt_embeds")

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = [], None
        with self._grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                out = encoder(self._tokens(tokenizer, captions), output_hidden_states=True)
                # diffusers' rule: the pooled embedding is the last encoder's 2-D first output (text_embeds)
                if out[0].ndim == 2:
                    pooled = out[0]
                states.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "pooled_prompt_embeds": pooled}

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text = self.text_outputs(batch)
        added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": add_time_ids(batch, self.device)}
        return text["encoder_hidden_states"], added


def conditioning_for(family: str, tokenizers, text_encoders, device, train_text_encoder: bool) -> Conditioning:
    kind = SDXLConditioning if family == "sdxl" else Conditioning
    return kind(list(tokenizers), list(text_encoders), device, train_text_encoder)

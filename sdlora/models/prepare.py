"""Make a loaded base trainable: quantize its frozen weights, attach LoRA, store and place the frozen weights, and
switch on the attention backend and speed levers the config asks for. The model half of a run's setup."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sdlora.config import ConfigError, DataSection, LoraSection, RunConfig
from sdlora.models import families, lora, sd3
from sdlora.models.base import BaseModel, place, set_attention_backend
from sdlora.models.precision import store_frozen_weights
from sdlora.models.quantize import quantize_frozen

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TrainableModels:
    base: BaseModel  # with LoRA attached to its UNet (and text encoders when they train)
    trained_encoders: dict[str, torch.nn.Module]  # by adapter component; empty unless lora.train_text_encoder
    prediction_type: str  # what the UNet is trained to predict (train.prediction_type or the base's own; SD3: flow)
    attention: str  # the attention backend in use


def adapter_shape(section: LoraSection, targets: tuple[str, ...], convs: tuple[str, ...] = ()) -> lora.AdapterShape:
    """The adapter `section` asks for on these targets; `convs` (LoCon, full module paths) at conv rank / alpha."""
    rank_pattern = {m: section.conv_rank for m in convs if section.conv_rank != section.rank}
    conv_alpha = section.effective_conv_alpha
    alpha_pattern = {m: conv_alpha for m in convs if conv_alpha != section.effective_alpha}
    return lora.AdapterShape(section.rank, section.effective_alpha, targets + convs, section.dropout, rank_pattern,
                             alpha_pattern, kind=section.type, factor=section.factor,
                             decompose_both=section.decompose_both)


def check_resolution(base: BaseModel, data: DataSection) -> None:
    """The training sizes against the factor this base's VAE downsamples by (2 per encoder block after the first:
    8 for Stable Diffusion, 4 for sdlora:shapes); the schema checked only the rule every base shares."""
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    sizes = {"data.resolution": data.resolution}
    if data.bucketing.enabled:
        sizes["data.bucketing.step"] = data.bucketing.step
    for name, value in sizes.items():
        if value % factor:
            near = [size for size in (value // factor * factor, (value // factor + 1) * factor) if size]
            raise ConfigError(f"{name}: {base.source}'s VAE downsamples images by {factor}, so {name} must be a "
                              f"multiple of {factor}, got {value}; use {' or '.join(map(str, near))}")


def prepare_for_training(base: BaseModel, config: RunConfig, device: torch.device,
                         weight_dtype: torch.dtype) -> TrainableModels:
    train, lora_cfg = config.train, config.lora
    check_resolution(base, config.data)
    quantize_frozen({"unet": base.unet, **base.text_encoders}, config.model.quantize, device, weight_dtype)
    sd3_base = base.family == "sd3"
    if not sd3_base:
        sd3.refuse_sd3_fields(config, base.family)
    prediction_type = sd3.check_training(config) if sd3_base else train.prediction_type or base.prediction_type
    if prediction_type not in PREDICTION_TYPES and not sd3_base:
        # Checked here, not at the first step: a base whose scheduler predicts something else fails in seconds.
        raise ConfigError(
            f"{base.source}: its scheduler predicts {prediction_type!r}, which sdlora cannot train; set "
            f"train.prediction_type to one of {', '.join(PREDICTION_TYPES)}"
        )
    if train.zero_terminal_snr:
        base.scheduler = families.with_zero_terminal_snr(base.scheduler, prediction_type)
    convs = lora.conv_targets(base.unet) if lora_cfg.conv_rank is not None and not sd3_base else ()
    lora.attach(base.unet, adapter_shape(lora_cfg, lora_cfg.transformer_targets if sd3_base else lora_cfg.unet_targets,
                                         convs))
    # "Train the text encoder" means every CLIP text encoder of the base: SDXL's and SD3's two (kohya's te1 / te2);
    # SD3's T5 never trains (diffusers' script does not train it either).
    trained_encoders = ({name: encoder for name, encoder in base.text_encoders.items() if name != sd3.T5_COMPONENT}
                        if lora_cfg.train_text_encoder else {})
    for encoder in trained_encoders.values():
        lora.attach(encoder, adapter_shape(lora_cfg, lora_cfg.text_encoder_targets))
    # Stored before placing: stored weights keep their dtype through place(), so the full-size frozen model never
    # exists (and a GPU receives half the bytes).
    for module in (base.unet, *base.text_encoders.values()):
        store_frozen_weights(module, train.weight_storage, weight_dtype)
    place(base, device, weight_dtype)
    lora.cast_lora_to_fp32(base.unet, *base.text_encoders.values())
    attention = set_attention_backend(base.unet, train.attention, device)
    if train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in trained_encoders.values():
            encoder.gradient_checkpointing_enable()
    apply_speed_options(base.unet, train.channels_last, train.compile)
    return TrainableModels(base, trained_encoders, prediction_type, attention)


def apply_speed_options(unet: torch.nn.Module, channels_last: bool, compile_unet: bool) -> None:
    """channels-last convolutions and torch.compile, in place: the module keeps its identity and its LoRA keys.
    Neither changes what the UNet computes; each is a config switch so `scripts/bench.py` can measure it."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        # nn.Module.compile keeps parameter names (no `_orig_mod.` prefix), so saving and resuming are unchanged.
        unet.compile()
        log.info("train.compile: the UNet is compiled on its first step (slow), later steps reuse the graph")

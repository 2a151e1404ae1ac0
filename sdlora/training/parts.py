"""What the loop runs on, built from a prepared base: the optimizer and schedule, the models accelerate wraps, the
family's conditioning and objective (`build_parts`), and the latent / text caches filled before step one
(`attach_caches`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from sdlora.config import RunConfig
from sdlora.data import CaptionedImageDataset, cache
from sdlora.models import BaseModel, families, lora, sd3
from sdlora.models.prepare import TrainableModels
from sdlora.training import distributed
from sdlora.training.diffusion import LossSpec
from sdlora.training.flow import FlowObjective
from sdlora.training.loop import TrainingParts
from sdlora.training.optim import build_optimizer


def build_parts(cfg: RunConfig, accelerator: Accelerator, models: TrainableModels, weight_dtype: torch.dtype
                ) -> tuple[TrainingParts, dict[str, torch.nn.Module]]:
    """The optimizer and schedule, the models prepared by accelerate, and everything the loop reads; with the
    (wrapped) models whose LoRA is trained, by adapter-file component: what checkpoints and saves read."""
    base = models.base
    unet_params = [(n, p) for n, p in base.unet.named_parameters() if p.requires_grad]
    te_params = [(n, p) for e in models.trained_encoders.values() for n, p in e.named_parameters()
                 if p.requires_grad]
    optimizer = build_optimizer(cfg, unet_params, te_params)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.steps,
    )
    distributed.check_strategy(accelerator, cfg)
    distributed.configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.max_grad_norm)
    # Only trained encoders are wrapped (SD3's T5 never trains); the conditioning gets every encoder, in order.
    unet, *trained, optimizer = accelerator.prepare(base.unet, *models.trained_encoders.values(), optimizer)
    wrapped = dict(zip(models.trained_encoders, trained))
    text_encoders = [wrapped.get(name, encoder) for name, encoder in base.text_encoders.items()]
    trained_models = {base.denoiser_component: unet, **wrapped}
    # FSDP replaces parameters with sharded ones: clip what the optimizer now holds.
    params = [p for model in trained_models.values() for p in model.parameters() if p.requires_grad]
    if base.family == "sd3":  # three text encoders, and a rectified-flow objective instead of a noise schedule
        conditioning = sd3.conditioning(base, text_encoders, accelerator.device, cfg.lora.train_text_encoder,
                                        cfg.model.t5_max_length)
        flow = FlowObjective.from_config(cfg.flow, base.scheduler.config)
    else:
        conditioning = families.conditioning_for(base.family, base.tokenizers, text_encoders, accelerator.device,
                                                 cfg.lora.train_text_encoder)
        flow = None
    parts = TrainingParts(
        accelerator=accelerator, unet=unet, text_encoder=text_encoders[0], vae=base.vae,
        noise_scheduler=base.scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler,
        params=params, generator=torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed),
        prediction_type=models.prediction_type, weight_dtype=weight_dtype,
        gradient_accumulation=cfg.train.gradient_accumulation, max_grad_norm=cfg.train.max_grad_norm,
        noise_offset=cfg.train.noise_offset, snr_gamma=cfg.train.snr_gamma,
        loss=LossSpec(cfg.train.loss_type, cfg.train.huber_c, cfg.train.huber_schedule),
        timestep_range=(cfg.train.min_timestep, cfg.train.max_timestep),
        train_text_encoder=cfg.lora.train_text_encoder,
        conditioning=conditioning, trained_models=tuple(trained_models.values()), flow=flow,
        set_adapter_weight=lora.weight_setter(*trained_models.values()),
    )
    return parts, trained_models


def attach_caches(cfg: RunConfig, parts: TrainingParts, base: BaseModel, accelerator: Accelerator,
                  dataset: CaptionedImageDataset, cache_dir: Path, weight_dtype: torch.dtype) -> cache.CacheStats:
    """Encode every image / caption not cached yet; training then reads the cache and skips those encoders."""
    vae = base.vae

    def encode_latents(pixels: torch.Tensor):
        dist = vae.encode(pixels.to(accelerator.device, dtype=vae.dtype)).latent_dist
        return dist.mean, dist.std

    encoders = list(base.text_encoders.values())
    return cache.attach_caches(
        dataset, cache_dir,
        latent_encoder=encode_latents if cfg.data.cache_latents else None,
        latent_model_key=f"{cache.module_fingerprint(vae)}:{vae.dtype}",
        # The family's own encoder: SDXL caches both encoders' states and the pooled embedding.
        text_encoder=parts.conditioning.encode_text if cfg.data.cache_text_embeddings else None,
        text_model_key=":".join(cache.module_fingerprint(e) for e in encoders)
        + f":{len(base.tokenizer)}:{base.tokenizer.model_max_length}:{weight_dtype}"
        + (f":t5-{cfg.model.t5_max_length}" if base.family == "sd3" else ""),
        batch_size=cfg.train.batch_size, progress=tqdm if accelerator.is_main_process else None,
        share=lambda work: distributed.shard_for_process(work, accelerator.num_processes,
                                                         accelerator.process_index),
        barrier=accelerator.wait_for_everyone,
    )


"""The training loop, and nothing else: no file formats, no config files, no image decoding.

`fit` runs optimizer steps, each over `gradient_accumulation` micro-batches, and calls `hooks.after_step` so the
caller can checkpoint, sample or save. Randomness comes only from `parts.generator` (noise, timesteps, latent
sampling) and torch's global RNG (LoRA dropout), both of which checkpoints capture, so a resumed run is the
same run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from sdlora.training import diffusion, optim
from sdlora.training.flow import FlowObjective, flow_loss, noisy_latents


@dataclass
class TrainingParts:
    accelerator: Any
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[torch.nn.Parameter]
    generator: torch.Generator
    prediction_type: str
    # batch -> (encoder_hidden_states, added_cond_kwargs or None), from `families.conditioning_for`; a cached batch
    # carries the text states and skips the encoders.
    conditioning: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor] | None]]
    weight_dtype: torch.dtype = torch.float32
    gradient_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    loss: diffusion.LossSpec = diffusion.LossSpec()
    timestep_range: tuple[int, int | None] = (0, None)  # [min, max) of the timesteps drawn; None: all
    train_text_encoder: bool = False
    # Test hook: called with the step number; True multiplies that step's loss by inf (numeric-safety tests).
    inject_inf: Callable[[int], bool] | None = None
    # Every (wrapped) model whose LoRA trains, for gradient-sync windows; empty: the unet (and text_encoder if
    # trained). SDXL passes its second text encoder here too.
    trained_models: tuple[torch.nn.Module, ...] = ()
    # SD3: rectified-flow training (`training.flow`) of a transformer in place of the UNet's diffusion objective.
    flow: FlowObjective | None = None
    # Sets every trained adapter's weight (1.0: as saved); batches of images with another `adapter_weight` train
    # at theirs (`models.lora.weight_setter`).
    set_adapter_weight: Callable[[float], None] | None = None


class Hooks(Protocol):
    def after_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> None: ...

    def should_stop(self) -> bool: ...


def _global_draw(parts: TrainingParts, fn, batch_size: int):
    """Draw for the whole global batch and keep this process's slice, so N processes with batch b equal one
    process with batch N*b (same noise and timesteps per sample)."""
    world, rank = parts.accelerator.num_processes, parts.accelerator.process_index
    full = fn(batch_size * world)
    return full[rank * batch_size : (rank + 1) * batch_size]


def encode_images(parts: TrainingParts, pixel_values: torch.Tensor) -> torch.Tensor:
    vae = parts.vae
    with torch.no_grad():
        pixels = pixel_values.to(parts.accelerator.device, dtype=vae.dtype)
        latent_dist = vae.encode(pixels).latent_dist
    return sample_latents(parts, latent_dist.mean, latent_dist.std)


def sample_latents(parts: TrainingParts, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Draw from the VAE's latent distribution; cached (mean, std) take the same draws as a live encode."""
    vae = parts.vae
    with torch.no_grad():
        mean = mean.to(parts.accelerator.device, dtype=vae.dtype)
        std = std.to(parts.accelerator.device, dtype=vae.dtype)
        latents = mean + std * _global_draw(
            parts,
            lambda n: torch.randn((n, *mean.shape[1:]), generator=parts.generator, device=mean.device),
            mean.shape[0],
        ).to(mean.dtype)
    # SD3's VAE also centres its latents (shift_factor); the SD VAEs have none.
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def micro_step_loss(parts: TrainingParts, batch: dict[str, Any]) -> torch.Tensor:
    """Diffusion loss of one micro-batch. Cached batches carry latents / text states and skip the encoders."""
    if "latents" in batch:
        latents = batch["latents"]
    elif "latent_mean" in batch:
        latents = sample_latents(parts, batch["latent_mean"], batch["latent_std"])
    else:
        latents = encode_images(parts, batch["pixel_values"])
    latents = latents.to(parts.accelerator.device, dtype=torch.float32)
    states, added_cond = parts.conditioning(batch)
    if added_cond is not None:
        added_cond = {key: value.to(parts.weight_dtype) for key, value in added_cond.items()}
    size, device = latents.shape[0], latents.device
    noise = _global_draw(
        parts,
        lambda n: diffusion.sample_noise(
            torch.empty((n, *latents.shape[1:]), device=device), parts.generator, parts.noise_offset
        ),
        size,
    )
    if parts.flow is not None:
        return _flow_loss(parts, batch, latents, noise, states, added_cond)
    total = parts.noise_scheduler.config.num_train_timesteps
    timesteps = _global_draw(
        parts, lambda n: diffusion.sample_timesteps(n, total, parts.generator, device, parts.timestep_range), size
    )
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    with parts.accelerator.autocast():
        prediction = parts.unet(
            noisy.to(parts.weight_dtype), timesteps, states.to(parts.weight_dtype), added_cond_kwargs=added_cond,
            return_dict=False,
        )[0]
    target = diffusion.training_target(parts.noise_scheduler, latents, noise, timesteps, parts.prediction_type)
    return diffusion.diffusion_loss(
        prediction, target, timesteps, parts.noise_scheduler, parts.prediction_type, parts.snr_gamma,
        batch.get("loss_weights"), parts.loss, batch.get("masks"),
    )


def _flow_loss(parts: TrainingParts, batch, latents, noise, states, added_cond) -> torch.Tensor:
    """SD3: the transformer predicts the velocity at a point on the straight noise path (`training.flow`)."""
    objective = parts.flow
    u = _global_draw(parts, lambda n: objective.sample_u(n, parts.generator, latents.device), latents.shape[0])
    sigmas = objective.sigmas_at(u)
    noisy = noisy_latents(latents, noise, sigmas)
    with parts.accelerator.autocast():
        prediction = parts.unet(
            hidden_states=noisy.to(parts.weight_dtype), timestep=sigmas * objective.num_train_timesteps,
            encoder_hidden_states=states.to(parts.weight_dtype), return_dict=False, **added_cond,
        )[0]
    return flow_loss(objective, prediction, latents, noise, noisy, sigmas, batch.get("loss_weights"))


def use_adapter_weight(parts: TrainingParts, batch: dict[str, Any] | None) -> None:
    """Train this micro-batch at its images' adapter weight (the sampler never mixes weights in a batch); None puts
    the adapter back at 1.0, as samples, validation and saving see it."""
    if parts.set_adapter_weight is None:
        return
    weights = None if batch is None else batch.get("adapter_weights")
    if weights is None or not len(weights):
        parts.set_adapter_weight(1.0)
        return
    weight = float(weights[0])
    if not bool((weights == weights[0]).all()):
        raise ValueError(f"a batch mixes adapter weights {sorted(set(weights.tolist()))}: the sampler must group them")
    parts.set_adapter_weight(weight)


def _step_is_finite(parts: TrainingParts, step_loss: float) -> bool:
    """Loss and gradients all finite, decided the same on every process. Under fp16 the grad scaler already skips
    overflowing steps (and lowers its scale), so there only the loss is checked."""
    bad = not math.isfinite(step_loss)
    if not bad and parts.accelerator.scaler is None:
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in parts.params if p.grad is not None]
        bad = bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())
    if parts.accelerator.num_processes > 1:
        flag = torch.tensor(float(bad), device=parts.accelerator.device)
        bad = bool(parts.accelerator.reduce(flag, reduction="sum").item() > 0)
    return not bad


def _advance_schedule(parts: TrainingParts) -> None:
    """One scheduler step per training step, the optimizer's skipped or not: the LR follows the step count, so a
    run resumed at step N has the LR of step N. torch warns when this happens before any optimizer step (a first
    step that was non-finite); here that is intended, so that message only is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                category=UserWarning)
        parts.lr_scheduler.step()


def fit(parts: TrainingParts, batches: Iterator[dict[str, Any]], start_step: int, total_steps: int, hooks: Hooks,
        progress=None) -> list[float]:
    """Run optimizer steps start_step+1 .. total_steps; returns each step's mean micro-batch loss."""
    accelerator, losses = parts.accelerator, []
    if accelerator.gradient_accumulation_steps != parts.gradient_accumulation:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) must equal "
            f"parts.gradient_accumulation ({parts.gradient_accumulation}): it scales the loss and picks the sync step"
        )
    trained = parts.trained_models or ((parts.unet, parts.text_encoder) if parts.train_text_encoder else (parts.unet,))
    parts.unet.train()
    optim.set_train_mode(parts.optimizer)
    for step in range(start_step + 1, total_steps + 1):
        step_loss = 0.0
        for _ in range(parts.gradient_accumulation):
            # accelerate all-reduces only on the last micro-batch of the window (DDP/FSDP no_sync, DeepSpeed's
            # boundary flag) and divides the loss by the window length (Accelerator(gradient_accumulation_steps)).
            batch = next(batches)
            use_adapter_weight(parts, batch)
            with accelerator.accumulate(*trained):
                loss = micro_step_loss(parts, batch)
                if parts.inject_inf is not None and parts.inject_inf(step):
                    loss = loss * float("inf")
                accelerator.backward(loss)
            step_loss += loss.detach().float().item() / parts.gradient_accumulation
        use_adapter_weight(parts, None)
        # The norm before clipping, as accelerate returns it (None under DeepSpeed, which clips in its own step).
        # Without clipping it is still measured the same way: a limit of inf scales every gradient by exactly 1.0.
        grad_norm = accelerator.clip_grad_norm_(parts.params, parts.max_grad_norm or math.inf)
        # A non-finite step updates nothing; the hooks see its loss as NaN and decide about rollbacks. Under fp16
        # the scaler's step must still run (it skips non-finite gradients itself and lowers its scale).
        finite = _step_is_finite(parts, step_loss)
        if finite or accelerator.scaler is not None:
            parts.optimizer.step()
        if not finite:
            step_loss = float("nan")
        _advance_schedule(parts)
        parts.optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        lr = parts.lr_scheduler.get_last_lr()[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        hooks.after_step(step, step_loss, lr, None if grad_norm is None else float(grad_norm))
        if hooks.should_stop():
            break
    return losses

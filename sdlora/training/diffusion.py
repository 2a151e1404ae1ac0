"""Pure functions of the diffusion objective: noise, timesteps, targets and loss weighting.

Every random draw takes an explicit generator so a run is reproducible and resumable bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.config import ConfigError


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; with an offset, plus a per-channel constant.

    The offset (Guttenberg, "Diffusion with Offset Noise", 2023) lets the model learn to change an image's mean
    brightness, which plain noise hides from it; ~0.05 is typical.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        offset = torch.randn(shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator, device,
                     timestep_range: tuple[int, int | None] = (0, None)) -> torch.Tensor:
    """Uniform timesteps in [low, high) (default: all of them). Training only low or only high timesteps steers a
    LoRA towards composition (high noise) or detail (low noise)."""
    low, high = timestep_range
    high = num_train_timesteps if high is None else high
    if high > num_train_timesteps:
        raise ConfigError(f"train.max_timestep ({high}) is above the base scheduler's {num_train_timesteps} "
                          f"timesteps; set train.max_timestep to at most {num_train_timesteps}")
    return torch.randint(low, high, (batch_size,), generator=generator, device=device).long()


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity v = sqrt(a) * eps - sqrt(1 - a) * x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(
        f"train.prediction_type: sdlora cannot train a {prediction_type!r} target (the base's scheduler asks for it "
        "when the field is unset); set train.prediction_type to 'epsilon' or 'v_prediction'"
    )


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting", 2023).

    For an epsilon target the per-timestep weight is min(SNR, gamma) / SNR; for a v target the SNR of the
    equivalent x0 objective is SNR + 1, hence min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


@dataclass(frozen=True)
class LossSpec:
    """The per-element loss: l2 (the default), l1, or pseudo-Huber with threshold `huber_c` on a schedule."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"


def huber_thresholds(spec: LossSpec, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber threshold c(t), shape (batch,), as kohya's and diffusers' scripts schedule it (Patel et al.,
    "Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", 2024): a small c
    (near L1, robust to outliers) at high noise and a large one (near L2) at low noise."""
    timesteps = timesteps.float()
    if spec.huber_schedule == "constant":
        return torch.full_like(timesteps, spec.huber_c)
    if spec.huber_schedule == "exponential":
        total = scheduler.config.num_train_timesteps
        return torch.exp(math.log(spec.huber_c) * timesteps / total)
    alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return (1.0 - spec.huber_c) / (1.0 + sigma) ** 2 + spec.huber_c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, spec: LossSpec, scheduler,
                     timesteps: torch.Tensor) -> torch.Tensor:
    if spec.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if spec.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_thresholds(spec, scheduler, timesteps).view(-1, *([1] * (pred.dim() - 1)))
    pseudo_huber = torch.sqrt((pred - target) ** 2 + c**2) - c
    # huber: 2c(...) tends to the squared error for small residuals; smooth_l1: 2(...) tends to the absolute error.
    return 2 * c * pseudo_huber if spec.loss_type == "huber" else 2 * pseudo_huber


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (batch, 1, H, W) in [0, 1] at latent resolution: each latent cell gets the mean of the pixels it
    covers, so a cell whose pixels are all masked out weighs exactly zero."""
    return F.interpolate(mask.float(), size=size, mode="area")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: str,
    snr_gamma: float | None = None,
    sample_weights: torch.Tensor | None = None,
    spec: LossSpec = LossSpec(),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss in fp32, optionally weighted per pixel (masked loss: kohya's convention, masked elements count as
    zero in the mean) and per sample (min-SNR, per-dataset loss weights, the prior loss weight)."""
    per_element = elementwise_loss(model_pred.float(), target.float(), spec, scheduler, timesteps)
    if mask is not None:
        per_element = per_element * latent_mask(mask.to(per_element.device), per_element.shape[-2:])
    per_sample = per_element.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(snr(scheduler, timesteps), snr_gamma, prediction_type)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()

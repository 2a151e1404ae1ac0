"""Pure functions of the diffusion objective: noise, timesteps, targets and loss weighting.

Every random draw takes an explicit generator so a run is reproducible and resumable bit for bit.
"""

from __future__ import annotations

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


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


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


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: str,
    snr_gamma: float | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-squared error in fp32, optionally weighted per sample (min-SNR, per-dataset loss weights)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(snr(scheduler, timesteps), snr_gamma, prediction_type)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()

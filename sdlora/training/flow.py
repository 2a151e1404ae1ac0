"""Rectified-flow training for SD3 / SD3.5: timestep sampling, noising, the target and the loss weight.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (2024), as diffusers'
`train_dreambooth_lora_sd3.py` and `training_utils` implement it:
- u in [0, 1] from logit-normal, mode or uniform sampling (sec. 3.1); the timestep is the base scheduler's
  shifted timestep at index floor(u * N) of its training table, sigma = t / N;
- x_t = (1 - sigma) * x0 + sigma * noise, and the transformer predicts the velocity v = noise - x0;
- preconditioned (the script's default), the prediction becomes x_t - sigma * v_pred and is compared with x0;
- an optional per-sample weight: 1 / sigma^2 ('sigma_sqrt') or the cosine map 2 / (pi * (1 - 2 sigma + 2 sigma^2)).

Every draw takes the run's generator, so a resumed run is the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowObjective:
    """The `flow:` section's choices and the schedule's shifted sigma table (sigma[i] for training index i)."""

    sigmas: torch.Tensor  # [N], descending from 1: the scheduler's own `sigmas` at construction
    num_train_timesteps: int
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    precondition_outputs: bool = True

    @classmethod
    def from_config(cls, section, scheduler_config) -> FlowObjective:
        """From the `flow:` section and the base's FlowMatchEulerDiscreteScheduler config (its shift unless the
        section sets one)."""
        shift = section.shift if section.shift is not None else scheduler_config.get("shift", 1.0)
        return cls(shifted_sigmas(scheduler_config["num_train_timesteps"], shift),
                   scheduler_config["num_train_timesteps"], section.timestep_sampling, section.logit_mean,
                   section.logit_std, section.mode_scale, section.loss_weighting, section.precondition_outputs)

    def sample_u(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """u in [0, 1] per sample (diffusers' `compute_density_for_timestep_sampling`)."""
        if self.timestep_sampling == "logit_normal":
            normal = torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator, device=device)
            return torch.sigmoid(normal)
        u = torch.rand((n,), generator=generator, device=device)
        if self.timestep_sampling == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sigmas_at(self, u: torch.Tensor) -> torch.Tensor:
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.sigmas.to(u.device)[index]

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """diffusers' `compute_loss_weighting_for_sd3`, per sample."""
        if self.loss_weighting == "sigma_sqrt":
            return sigmas.float() ** -2.0
        if self.loss_weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return torch.ones_like(sigmas)


def shifted_sigmas(num_train_timesteps: int, shift: float) -> torch.Tensor:
    """The FlowMatchEulerDiscreteScheduler's training sigmas: N..1 over N, then shift * s / (1 + (shift - 1) * s)."""
    sigmas = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0)
    sigmas = sigmas / num_train_timesteps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t on the straight path from the clean latents (sigma 0) to the noise (sigma 1)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise


def flow_loss(objective: FlowObjective, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
              noisy: torch.Tensor, sigmas: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE in fp32, per sample then averaged, as the reference script reduces it."""
    prediction = prediction.float()
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).float()
    if objective.precondition_outputs:
        prediction = prediction * (-s) + noisy.float()
        target = latents.float()
    else:
        target = noise.float() - latents.float()
    weights = objective.loss_weights(sigmas.float()).view_as(s)
    per_sample = (weights * (prediction - target) ** 2).reshape(latents.shape[0], -1).mean(dim=1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()

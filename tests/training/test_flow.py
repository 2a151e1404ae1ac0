"""Rectified-flow pieces against diffusers' own SD3 training utilities and scheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdlora.config import load_config
from sdlora.training.flow import FlowObjective, flow_loss, noisy_latents, shifted_sigmas


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sigma_table_is_the_schedulers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert torch.allclose(shifted_sigmas(1000, shift), scheduler.sigmas, atol=1e-7)
    assert torch.allclose(shifted_sigmas(1000, shift) * 1000, scheduler.timesteps, atol=1e-4)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_sampling_draws_what_diffusers_draws(scheme):
    section = load_config(None, [f"flow.timestep_sampling={scheme}", "flow.logit_mean=0.3", "flow.logit_std=0.8"]).flow
    objective = FlowObjective.from_config(section, {"num_train_timesteps": 1000, "shift": 3.0})
    ours = objective.sample_u(64, torch.Generator().manual_seed(5), "cpu")
    theirs = compute_density_for_timestep_sampling(
        "none" if scheme == "uniform" else scheme, 64, logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
        generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, theirs)
    assert ((0 <= ours) & (ours <= 1)).all()


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers(weighting):
    objective = FlowObjective.from_config(load_config(None, [f"flow.loss_weighting={weighting}"]).flow,
                                          {"num_train_timesteps": 1000, "shift": 3.0})
    sigmas = torch.tensor([0.05, 0.4, 0.9])
    assert torch.allclose(objective.loss_weights(sigmas), compute_loss_weighting_for_sd3(weighting, sigmas).float())


def test_the_target_and_preconditioning():
    torch.manual_seed(0)
    x0, noise, pred = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([0.2, 0.7])
    xt = noisy_latents(x0, noise, sigmas)
    assert torch.allclose(xt[1], 0.3 * x0[1] + 0.7 * noise[1])
    config = {"num_train_timesteps": 1000, "shift": 3.0}
    plain = FlowObjective.from_config(load_config(None, ["flow.precondition_outputs=false"]).flow, config)
    pre = FlowObjective.from_config(load_config(None, []).flow, config)
    velocity = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(flow_loss(plain, pred, x0, noise, xt, sigmas), velocity.mean())
    # preconditioned: x_t - sigma * v_pred against x0, i.e. sigma^2 times the velocity error
    assert torch.allclose(flow_loss(pre, pred, x0, noise, xt, sigmas), (sigmas**2 * velocity).mean(), atol=1e-6)

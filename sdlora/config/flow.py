"""The `flow:` section: how an SD3 (rectified-flow) base is trained. Unused by the UNet families.

Defaults are those of diffusers' `train_dreambooth_lora_sd3.py` (logit-normal(0, 1) timesteps, mode scale 1.29,
preconditioned outputs, no extra loss weight); the schemes are the SD3 paper's (Esser et al., "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", 2024, sec. 3.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sdlora.config.section import Section


class FlowSection(Section):
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = Field(
        "logit_normal",
        description="How training draws u in [0, 1], the position on the noise schedule: 'logit_normal' "
        "(sigmoid of a normal; favours the middle), 'mode' (mode sampling with heavy tails, see mode_scale) or "
        "'uniform'. The timestep is the base scheduler's shifted timestep at u.",
    )
    logit_mean: float = Field(0.0, description="Mean of the normal behind 'logit_normal' sampling.")
    logit_std: float = Field(1.0, gt=0, description="Standard deviation of the normal behind 'logit_normal'.")
    mode_scale: float = Field(1.29, description="Scale s of 'mode' sampling (the SD3 paper's 1.29).")
    shift: float | None = Field(
        None, gt=0,
        description="Timestep shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma); larger values train at "
        "noisier steps. Default: the base scheduler's own (3.0 for SD3 and SD3.5).",
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="Per-sample loss weight: 'none', 'sigma_sqrt' (1 / sigma^2) or 'cosmap' (the SD3 paper's "
        "cosine-map weight); diffusers' weighting_scheme of the same names.",
    )
    precondition_outputs: bool = Field(
        True,
        description="Turn the predicted velocity into a clean-latent estimate (x_t - sigma * v) and compare it with "
        "the clean latents, as diffusers' script does by default; false compares velocities (noise - x0).",
    )

"""Speed levers that change how the UNet runs but not what it computes: memory format, compilation, loading.

Each is a config switch so the benchmark (`scripts/bench.py`) can measure it on and off; none is on by default
unless it never loses (pinned memory on CUDA, persistent workers when there are workers).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def apply_speed_options(unet: torch.nn.Module, channels_last: bool, compile_unet: bool) -> None:
    """channels-last convolutions and torch.compile, in place: the module keeps its identity and its LoRA keys."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        # nn.Module.compile keeps parameter names (no `_orig_mod.` prefix), so saving and resuming are unchanged.
        unet.compile()
        log.info("train.compile: the UNet is compiled on its first step (slow), later steps reuse the graph")


def loader_options(num_workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader arguments that keep the next batch ready: pinned pages for fast host-to-GPU copies, and workers
    that survive between epochs instead of being respawned (each respawn stalls a step)."""
    options: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=2)
    return options

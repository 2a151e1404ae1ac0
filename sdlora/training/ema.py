"""An exponential moving average of the LoRA weights (Polyak averaging), kept beside the training weights.

After every `ema.every`-th optimizer step n (counting updates u = 0, 1, ...):

    decay_u = decay                                  (ema.warmup off)
    decay_u = min(decay, (1 + u) / (10 + u))         (ema.warmup on: diffusers' EMAModel ramp)
    ema     = decay_u * ema + (1 - decay_u) * weights

It starts at the initial LoRA weights, in fp32. The average is read by swapping it into the live parameters
(`applied`), so the adapter file, its kohya copy and sample images are made by the very code that makes the raw
ones; the raw weights are copied back bit for bit. Its state (the average and the update count) goes into every
checkpoint, so a resumed run's EMA is the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from sdlora.config.monitoring import EmaSection
from sdlora.training.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def decay_at(section: EmaSection, updates: int) -> float:
    """The decay of update number `updates` (0-based)."""
    if not section.warmup:
        return section.decay
    return min(section.decay, (1 + updates) / (10 + updates))


class AdapterEma:
    def __init__(self, section: EmaSection, params: dict[str, torch.nn.Parameter]):
        """`params`: every trainable (LoRA) parameter by name, the live tensors (not copies)."""
        self.section = section
        self.params = params
        self.updates = 0
        with torch.no_grad():
            self.shadow = {name: p.detach().to(self._device(p), dtype=torch.float32, copy=True)
                           for name, p in params.items()}

    def _device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.section.on_cpu else param.device

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step % self.section.every:
            return
        decay = decay_at(self.section, self.updates)
        for name, param in self.params.items():
            average = self.shadow[name]
            average.mul_(decay).add_(param.detach().to(average.device, torch.float32), alpha=1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The live parameters hold the average inside the block, and exactly their own values again after it."""
        with torch.no_grad():
            raw = {name: p.detach().clone() for name, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(raw[name])

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any] | None, where: str) -> None:
        """Put back a `state_dict()` from checkpoint `where`; None (a checkpoint written without EMA) starts the
        average afresh at the restored weights."""
        if state is None:
            log.warning("%s holds no EMA (written with ema.enabled=false): the EMA starts at its weights", where)
            with torch.no_grad():
                for name, param in self.params.items():
                    self.shadow[name].copy_(param.detach())
            self.updates = 0
            return
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointError(f"{where}: its EMA does not match this run's LoRA (rank or targets differ)")
        with torch.no_grad():
            for name, value in state["shadow"].items():
                self.shadow[name].copy_(value)
        self.updates = int(state["updates"])

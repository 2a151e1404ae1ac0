"""A run's resumable state: what a checkpoint holds (LoRA weights, optimizer, LR schedule, scaler, RNG, data
position) and how it goes back into a live run. The file format itself is `checkpoint.py`'s business."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlora import rng
from sdlora.training import checkpoint, distributed, divergence
from sdlora.training.loop import TrainingParts

log = logging.getLogger(__name__)

GENERATOR = "noise"  # the name the training noise generator's state is stored under


def trainable_by_name(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Every trainable (LoRA) parameter, named '<component>.<parameter>' (component: unet, text_encoder, ...)."""
    return {
        f"{prefix}.{name}": param
        for prefix, module in models.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


@dataclass
class DataPosition:
    """How many samples the run has consumed, so a resume continues the data where it stopped, also on another
    number of processes. `origin`: (step, samples seen) where this process's segment of the run began."""

    layout: distributed.Layout
    origin: tuple[int, int] = (0, 0)

    def samples_seen(self, step: int) -> int:
        origin_step, origin_samples = self.origin
        return origin_samples + (step - origin_step) * self.layout.effective_batch


@dataclass
class Checkpointer:
    """Writes and restores a live run's checkpoints. All processes call `save` (gathering can be collective); the
    main process writes."""

    folder: Path
    keep: int
    accelerator: object  # accelerate.Accelerator
    parts: TrainingParts
    trained_models: dict[str, torch.nn.Module]  # wrapped models whose LoRA trains, by adapter component
    trainable: dict[str, torch.nn.Parameter]  # `trainable_by_name` of the unwrapped models
    position: DataPosition
    batch_size: int
    on_saved: Callable[[Path], None] | None = field(default=None)  # e.g. a Hub pusher's submit
    run: dict = field(default_factory=dict)  # this run's record, written into every checkpoint (`ownership.claim`)
    # Optional parts with their own resumable state (`state_dict()` / `load_state_dict(state or None, where)`), by
    # name: the adapter EMA.
    components: dict[str, Any] = field(default_factory=dict)

    def save(self, step: int) -> None:
        accelerator, parts = self.accelerator, self.parts
        accelerator.wait_for_everyone()
        trainable = distributed.trainable_state(accelerator, self.trained_models)
        if accelerator.is_main_process:
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            divergence.require_finite(self.trainable, f"checkpoint at step {step}")
            state = checkpoint.TrainingState(
                step=step, micro_step=step * parts.gradient_accumulation, trainable=trainable,
                optimizer=parts.optimizer.state_dict(), lr_scheduler=parts.lr_scheduler.state_dict(),
                scaler=scaler, rng=rng.capture({GENERATOR: parts.generator}),
                extra={"world_size": accelerator.num_processes, "samples_seen": self.position.samples_seen(step)},
                run=self.run,
                components={name: part.state_dict() for name, part in self.components.items()},
            )
            path = checkpoint.save_checkpoint(self.folder, state, self.keep)
            log.info("checkpoint written: %s", path)
            if self.on_saved is not None:
                self.on_saved(path)
        accelerator.wait_for_everyone()

    def restore(self, resume: str) -> tuple[int, int]:
        """Load `resume` ('latest' or a checkpoint folder) into the live run; returns (step reached, samples seen)."""
        path = checkpoint.latest_checkpoint(self.folder) if resume == "latest" else Path(resume)
        if path is None:
            raise checkpoint.CheckpointError(f"--resume latest: no complete checkpoint in {self.folder}")
        state = checkpoint.load_checkpoint(path)
        if set(self.trainable) != set(state.trainable):
            raise checkpoint.CheckpointError(
                f"{path}: its LoRA does not match this config (rank, targets or text-encoder training differ)"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(state.trainable[name])
        parts, accelerator = self.parts, self.accelerator
        parts.optimizer.load_state_dict(state.optimizer)
        parts.lr_scheduler.load_state_dict(state.lr_scheduler)
        if state.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)
        rng.restore(state.rng, {GENERATOR: parts.generator})
        for name, part in self.components.items():
            part.load_state_dict(state.components.get(name), str(path))
        world_size = state.extra.get("world_size", 1)
        # Checkpoints from before samples_seen was stored were written by one process.
        seen = state.extra.get("samples_seen", state.micro_step * self.batch_size * world_size)
        if world_size != accelerator.num_processes:
            log.info(
                "resuming a %d-process run on %d processes: step counter and LR schedule continue at step %d, "
                "data continues after %d samples; effective batch is now %d",
                world_size, accelerator.num_processes, state.step, seen, self.position.layout.effective_batch,
            )
        log.info("resumed from %s at step %d", path, state.step)
        return state.step, seen

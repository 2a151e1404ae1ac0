"""A run's resumable state: what a checkpoint holds (LoRA weights, optimizer, LR schedule, scaler, RNG, data
position) and how it goes back into a live run. The file format itself is `checkpoint.py`'s business."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdlora.training import checkpoint
from sdlora.training import distributed
from sdlora.training import divergence

log = logging.getLogger(__name__)

GENERATOR = "noise"  # the name the training noise generator's state is stored under


def trainable_by_name(base) -> dict[str, torch.nn.Parameter]:
    """Every trainable (LoRA) parameter of the base, named '<component>.<parameter>'."""
    named = {}
    for prefix, module in (("unet", base.unet), *base.text_encoders.items()):
        for name, param in module.named_parameters():
            if param.requires_grad:
                named[f"{prefix}.{name}"] = param
    return named


def layout(run) -> distributed.Layout:
    train = run.config.train
    return distributed.Layout(run.accelerator.num_processes, train.batch_size, train.gradient_accumulation)


def samples_seen(run, step: int) -> int:
    origin_step, origin_samples = run.data_origin
    return origin_samples + (step - origin_step) * layout(run).effective_batch


def save(run, step: int) -> None:
    """Write a checkpoint of `run` at `step` (all processes take part; the main process writes)."""
    accelerator, parts = run.accelerator, run.parts
    accelerator.wait_for_everyone()
    trainable = distributed.trainable_state(accelerator, run.trained_models)
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        divergence.require_finite(trainable_by_name(run.base), f"checkpoint at step {step}")
        state = checkpoint.TrainingState(
            step=step, micro_step=step * parts.gradient_accumulation,
            trainable=trainable,
            optimizer=parts.optimizer.state_dict(), lr_scheduler=parts.lr_scheduler.state_dict(),
            scaler=scaler, rng=checkpoint.capture_rng({GENERATOR: parts.generator}),
            extra={"world_size": accelerator.num_processes, "samples_seen": samples_seen(run, step)},
        )
        path = checkpoint.save_checkpoint(run.output_dir / "checkpoints", state, run.config.train.keep_checkpoints)
        log.info("checkpoint written: %s", path)
        if run.pusher is not None:
            run.pusher.submit(path)
    accelerator.wait_for_everyone()


def restore(run, resume: str) -> tuple[int, int]:
    """Load `resume` ('latest' or a checkpoint folder) into the live run; returns (step reached, samples seen)."""
    folder = run.output_dir / "checkpoints"
    path = checkpoint.latest_checkpoint(folder) if resume == "latest" else Path(resume)
    if path is None:
        raise checkpoint.CheckpointError(f"--resume latest: no complete checkpoint in {folder}")
    state = checkpoint.load_checkpoint(path)
    named = trainable_by_name(run.base)
    if set(named) != set(state.trainable):
        raise checkpoint.CheckpointError(
            f"{path}: its LoRA does not match this config (rank, targets or text-encoder training differ)"
        )
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(state.trainable[name])
    run.parts.optimizer.load_state_dict(state.optimizer)
    run.parts.lr_scheduler.load_state_dict(state.lr_scheduler)
    if state.scaler is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state.scaler)
    checkpoint.restore_rng(state.rng, {GENERATOR: run.parts.generator})
    world_size = state.extra.get("world_size", 1)
    # Checkpoints from before samples_seen was stored were written by one process.
    seen = state.extra.get("samples_seen", state.micro_step * run.config.train.batch_size * world_size)
    if world_size != run.accelerator.num_processes:
        log.info(
            "resuming a %d-process run on %d processes: step counter and LR schedule continue at step %d, "
            "data continues after %d samples; effective batch is now %d",
            world_size, run.accelerator.num_processes, state.step, seen, layout(run).effective_batch,
        )
    log.info("resumed from %s at step %d", path, state.step)
    return state.step, seen

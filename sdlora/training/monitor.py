"""Watching a run: its validation loss, the EMA of its adapter and its live logs, in one object the run's hooks call.

Each part is off unless its section asks for it, and none changes what the raw adapter learns: validation scores
with its own fixed noise in isolated RNG, the EMA only reads the weights (and swaps itself in and back, bit for
bit, for its file and for samples), and trackers only write files.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdlora import formats
from sdlora.config import ConfigError, RunConfig
from sdlora.formats import lycoris_write
from sdlora.training import distributed, divergence, trackers
from sdlora.training.ema import AdapterEma
from sdlora.training.folder import RunFolder
from sdlora.training.loop import TrainingParts
from sdlora.training.validation import HeldOut, Validator

log = logging.getLogger(__name__)

EMA_SUFFIX = "_ema"  # the EMA adapter is `<output.name>_ema.safetensors`, beside the raw one
BEST_SUFFIX = "_best"  # validation.keep_best: `<output.name>_best.safetensors`


class BestScore:
    """The lowest validation loss so far and its step; in checkpoints, so a resumed run keeps the same best."""

    def __init__(self):
        self.loss: float | None = None
        self.step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step}

    def load_state_dict(self, state: dict[str, Any] | None, where: str) -> None:
        self.loss, self.step = (state["loss"], state["step"]) if state is not None else (None, None)


class Monitor:
    def __init__(self, config: RunConfig, folder: RunFolder, accelerator):
        """Built first thing in a run's setup: a tracker whose package is missing stops the run before a model
        loads."""
        if config.logging.tensorboard:
            trackers.require_tensorboard()
        self.config, self.folder, self.accelerator = config, folder, accelerator
        self.parts: TrainingParts | None = None
        self.validator: Validator | None = None
        self.ema: AdapterEma | None = None
        self.tracker: trackers.TensorBoardTracker | None = None
        self.best: BestScore | None = None
        self.make_adapter: Callable[[], formats.AdapterFile] | None = None

    @property
    def log_dir(self) -> Path:
        return self.config.logging.dir or self.folder.root / "logs"

    def attach(self, parts: TrainingParts, held_out: HeldOut, trainable: dict[str, torch.nn.Parameter],
               checkpoint_components: dict[str, Any], make_adapter: Callable[[], formats.AdapterFile]) -> None:
        """After the models are prepared, before a cached run frees its encoders (validation encodes its images
        now). The EMA and the best validation score join `checkpoint_components`, so checkpoints carry them.
        `make_adapter`: the run's adapter file as it is now (collective under FSDP / DeepSpeed)."""
        self.parts, self.make_adapter = parts, make_adapter
        if held_out.records:
            self.validator = Validator.prepare(self.config, held_out, parts)
        if self.config.validation.keep_best:
            self.best = BestScore()
            checkpoint_components["best_validation"] = self.best
        if self.config.ema.enabled:
            if distributed.is_sharded(self.accelerator):
                raise ConfigError("ema.enabled: FSDP and DeepSpeed split the LoRA weights across processes, so no "
                                  "process can average them; use DDP or set ema.enabled=false")
            self.ema = AdapterEma(self.config.ema, trainable)
            checkpoint_components["ema"] = self.ema

    # -- during the run ------------------------------------------------------------------------------------------

    def begin(self, start: int) -> None:
        """A (re)started segment of the run, at optimizer step `start` (0, or the checkpoint resumed from)."""
        self.finish()
        if self.config.logging.tensorboard and self.accelerator.is_main_process:
            self.tracker = trackers.TensorBoardTracker(self.log_dir, start + 1)

    def after_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> dict[str, float]:
        """EMA update and validation for this step (every process); returns what the step log adds: the gradient
        norm before clipping (when clipping, so measured) and the validation loss (when scored)."""
        if self.ema is not None:
            self.ema.after_step(step)
        logged: dict[str, float] = {}
        if grad_norm is not None and math.isfinite(grad_norm):
            logged["grad_norm"] = grad_norm
        every, last = self.config.validation.every, self.config.train.steps
        if self.validator is not None and ((every and step % every == 0) or step == last):
            logged["val_loss"] = self.validator.score(self.parts)
            log.info("step %d: validation loss %.5f", step, logged["val_loss"])
            self._keep_if_best(step, logged["val_loss"])
        if self.tracker is not None:
            scalars = {"loss/train": loss, "lr": lr} if math.isfinite(loss) else {"lr": lr}
            if "grad_norm" in logged:
                scalars["grad_norm"] = logged["grad_norm"]
            if "val_loss" in logged:
                scalars["loss/validation"] = logged["val_loss"]
            self.tracker.scalars(step, scalars)
        return logged

    def _keep_if_best(self, step: int, loss: float) -> None:
        """Every process decides alike (the score is the same on each) and gathers; the main process writes."""
        if self.best is None or (self.best.loss is not None and loss >= self.best.loss):
            return
        self.best.loss, self.best.step = loss, step
        self._write(self.make_adapter(), BEST_SUFFIX, {"sdlora.val_loss": repr(loss), "sdlora.step": str(step)})

    def sample_weights(self) -> contextlib.AbstractContextManager:
        """The weights samples are rendered with: the EMA's when `ema.use_for_samples`, else the raw ones."""
        if self.ema is not None and self.config.ema.use_for_samples:
            return self.ema.applied()
        return contextlib.nullcontext()

    def sample_rendered(self, step: int, path: Path | None) -> None:
        if self.tracker is not None and path is not None:
            self.tracker.image(step, "samples", path)

    # -- at the end ----------------------------------------------------------------------------------------------

    def write_ema_adapter(self, make_adapter: Callable[[], formats.AdapterFile]) -> Path | None:
        """`<output.name>_ema.safetensors` (and its kohya copy with `output.kohya`). Call on every process, like
        `make_adapter` (the run's `adapter`)."""
        if self.ema is None:
            return None
        with self.ema.applied():
            adapter = make_adapter()
        return self._write(adapter, EMA_SUFFIX, {"sdlora.ema_decay": str(self.config.ema.decay),
                                                 "sdlora.ema_updates": str(self.ema.updates)})

    def _write(self, adapter: formats.AdapterFile, suffix: str, metadata: dict[str, str]) -> Path | None:
        """`<output.name><suffix>.safetensors` (and its kohya copy with `output.kohya`), main process only."""
        if not self.accelerator.is_main_process:
            return None
        output = self.config.output
        name = f"{output.name}{suffix}"
        path = self.folder.adapter(name)
        divergence.require_finite({f"{c}.{k}": t for c, ts in adapter.tensors.items() for k, t in ts.items()},
                                  f"adapter {path}")
        adapter.metadata.update(metadata)
        lycoris_write.save_trained(path, adapter, title=name)
        log.info("adapter written: %s", path)
        if output.kohya:
            formats.save_kohya(self.folder.kohya_adapter(name), adapter, title=name)
        return path

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

"""Numeric safety: what to do when a step's loss, gradient or the LoRA weights stop being finite numbers.

Policy (fp16 overflow, a bad batch, a learning rate that is too high):
- a step whose loss or gradient is not finite is skipped (the loop does no optimizer update) and counted;
- no periodic checkpoint is written while such a run of skipped steps lasts, so a rollback lands before it;
- `safety.nan_patience` such steps in a row, or LoRA weights that became non-finite, roll the run back to the last
  checkpoint with the learning rate multiplied by `safety.nan_lr_factor`, at most `safety.nan_max_rollbacks` times;
- after that, or with no checkpoint to go back to, the run stops with a diagnosis, writing nothing;
- no adapter or checkpoint is ever written with a non-finite value (`require_finite` runs before every save).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from sdlora.errors import UserError

log = logging.getLogger(__name__)

ROLLBACK, STOP = "rollback", "stop"


class NumericError(UserError, RuntimeError):
    """Training diverged (or would write non-finite numbers); the message says where and what to try."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors if t.numel()]
    return not norms or bool(torch.isfinite(torch.stack(norms)).all())


def require_finite(named: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to write `what` when any tensor holds NaN or inf; the error names the first offenders."""
    if all_finite(named.values()):
        return
    bad = [name for name, tensor in named.items() if not bool(torch.isfinite(tensor.detach()).all())]
    raise NumericError(
        f"refusing to write {what}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''}); the previous file, if any, is unchanged"
    )


def scale_learning_rate(optimizer, lr_scheduler, factor: float) -> None:
    """Multiply the learning rate for the rest of the run. diffusers' schedules are LambdaLR (lr = base_lr *
    f(step)), so the base rates are scaled too, and the next scheduler step keeps the lower rate."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]
    if hasattr(lr_scheduler, "_last_lr"):
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


@dataclass
class NumericGuard:
    """Counts skipped steps and decides when a run of them means rollback or stop."""

    patience: int = 3
    lr_factor: float = 0.5
    max_rollbacks: int = 2
    skipped: int = 0
    rollbacks: int = 0
    streak: list[int] = field(default_factory=list)
    weights_bad_at: int | None = None
    action: str | None = None

    def record(self, step: int, loss: float, weights_finite: bool = True) -> str | None:
        """Record one finished step; returns ROLLBACK or STOP when the run must not go on as is."""
        if not weights_finite:
            self.weights_bad_at = step
            log.warning("step %d: the LoRA weights hold NaN or inf", step)
            return self._escalate()
        if math.isfinite(loss):
            self.streak.clear()
            return None
        self.skipped += 1
        self.streak.append(step)
        log.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row, %d skipped in total)",
            step, len(self.streak), self.skipped,
        )
        return self._escalate() if len(self.streak) >= self.patience else None

    def _escalate(self) -> str:
        self.action = ROLLBACK if self.rollbacks < self.max_rollbacks else STOP
        return self.action

    def rolled_back(self, to_step: int, lr_factor: float) -> None:
        self.rollbacks += 1
        log.warning(
            "rolling back to step %d with the learning rate x%g (rollback %d of %d)",
            to_step, lr_factor, self.rollbacks, self.max_rollbacks,
        )
        self.streak.clear()
        self.weights_bad_at = None
        self.action = None

    def diagnosis(self, learning_rate: float, checkpoint: str | None) -> str:
        if self.weights_bad_at is not None:
            what = f"the LoRA weights became NaN/inf at step {self.weights_bad_at}"
        else:
            what = (f"{len(self.streak)} steps in a row had a non-finite loss or gradient "
                    f"(steps {self.streak[0]}..{self.streak[-1]})")
        if checkpoint is None:
            tried = "there is no checkpoint to roll back to (set train.checkpoint_every to allow rollbacks)"
        else:
            tried = f"{self.rollbacks} rollback(s) to the last good checkpoint did not help"
        return (
            f"training diverged: {what}; {tried}. Try a lower train.learning_rate (the last was {learning_rate:.3g}), "
            "train.mixed_precision=bf16 or no instead of fp16, and keep train.max_grad_norm set. "
            f"{self.skipped} step(s) were skipped in all. The adapter file was not written"
            + (f"; the last good checkpoint is {checkpoint}" if checkpoint else "")
        )

"""What a run reports and what happens between its optimizer steps: the result, the publisher a caller hands in,
and the hooks `loop.fit` calls (log the step, checkpoint, sample, stop on a signal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdlora.training import divergence, steplog
from sdlora.training.folder import RunFolder

if TYPE_CHECKING:
    from sdlora.training.run import TrainingRun


@dataclass
class RunResult:
    output_dir: Path
    adapter_path: Path
    losses: list[float]
    final_step: int
    samples: list[Path] = field(default_factory=list)
    stopped_by: str | None = None  # signal name when a SIGINT/SIGTERM stopped the run early (resumable)


class Publisher(Protocol):
    """What happens to a run's outputs beyond its folder (the Hub's `RunPublisher`)."""

    def checkpoint_written(self, path: Path) -> None: ...

    def run_finished(self, folder: RunFolder, dataset_size: int) -> None: ...


class RunHooks:
    """What happens between optimizer steps: log, checkpoint, sample. Only the main process writes files."""

    def __init__(self, run: TrainingRun):
        self.run = run

    def after_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> None:
        run, train = self.run, self.run.config.train
        action = run.guard.record(step, loss, divergence.all_finite(run.parts.params))
        # EMA, validation, grad norm, trackers; nothing for a step that is rolled back or stops the run
        watched = run.monitor.after_step(step, loss, lr, grad_norm) if action is None else {}
        if run.accelerator.is_main_process:
            steplog.append_step(run.folder.step_log, step, loss, lr, watched)
        if action is not None:  # rolling back or stopping: this step's state is not worth keeping
            return
        # Not in the middle of a run of skipped steps: a rollback must land before the trouble started.
        every = train.checkpoint_every
        if every and step % every == 0 and step < train.steps and not run.guard.streak:
            run.save_checkpoint(step)
        sample_every = run.config.sample.every
        if sample_every and step % sample_every == 0 and step < train.steps:
            run.render_samples(step)

    def should_stop(self) -> bool:
        if self.run.guard.action is not None:
            return True
        accelerator = self.run.accelerator
        # Every process must stop at the same step: a signal seen by one is shared through accelerate's trigger.
        if self.run.stop.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

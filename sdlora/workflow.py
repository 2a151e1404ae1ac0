"""What a user runs, composed from the subpackages: the one place the CLI (and any other front end) starts a
training with its publishing, so no front end repeats the wiring."""

from __future__ import annotations

from sdlora.config import RunConfig
from sdlora.hub.publish import RunPublisher
from sdlora.training.run import RunResult, TrainingRun


def train(config: RunConfig, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Train as `sdlora train` does: the run, its model card, and (hub.push_checkpoints) its uploads. `overwrite`:
    delete another run's checkpoints and adapter in output.dir first (else such a folder is refused)."""
    run = TrainingRun(config, publisher=RunPublisher(config))
    run.prepare(resume, overwrite)  # the folder is checked before the model loads
    run.build()
    return run.fit(resume)

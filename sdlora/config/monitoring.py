"""The `validation:`, `ema:` and `logging:` sections: how a run is watched (held-out loss, an averaged adapter, live
logs). None of them changes what the raw adapter learns: a run with all three on trains the same weights."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from sdlora.config.section import Section


class ValidationSection(Section):
    """A held-out set scored with fixed noise and timesteps, so its loss compares across steps, runs and resumes.
    The set is `path`, a `fraction` of the training images, or a `data.sources` entry with `validation: true`."""

    path: Path | None = Field(
        None, description="Folder of held-out images with captions; an image also in the training data is refused."
    )
    fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Share of the training images held out instead of `path` (chosen by `seed`, never trained on).",
    )
    every: int = Field(
        0, ge=0, description="Score the held-out set every N steps, and at the last step (0: only there)."
    )
    timesteps: int = Field(
        4, ge=1, description="Timesteps each held-out image is scored at, spread evenly over the noise schedule."
    )
    seed: int = Field(0, description="Seed of the held-out split (with `fraction`) and of the fixed noise.")
    keep_best: bool = Field(
        False, description="Also write the adapter of the step with the lowest validation loss so far as "
        "`<output.name>_best` (raw weights; rewritten each time the loss improves)."
    )

    @property
    def enabled(self) -> bool:
        """A held-out set named in this section (a `data.sources` entry can name one too: RunConfig.validates)."""
        return self.path is not None or self.fraction > 0

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSection:
        if self.path is not None and self.fraction > 0:
            raise ValueError(
                "validation.path cannot be combined with validation.fraction (both name the held-out set): "
                "set one of them"
            )
        return self


class EmaSection(Section):
    """An exponential moving average of the LoRA weights, written beside the raw adapter."""

    enabled: bool = Field(False, description="Keep an EMA of the LoRA weights; written as `<output.name>_ema`.")
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay: ema = decay * ema + (1 - decay) * weights.")
    warmup: bool = Field(
        False, description="Ramp the decay up as min(decay, (1 + n) / (10 + n)) after n updates, so early weights "
        "fade fast (a short run's EMA is then not stuck near the initialisation)."
    )
    every: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    on_cpu: bool = Field(
        False, description="Keep the EMA in CPU memory instead of beside the weights (saves GPU memory)."
    )
    use_for_samples: bool = Field(
        False, description="Render `sample.prompts` with the EMA weights instead of the raw ones."
    )

    @model_validator(mode="after")
    def _needs_ema(self) -> EmaSection:
        if self.use_for_samples and not self.enabled:
            raise ValueError("ema.use_for_samples needs ema.enabled=true")
        return self


class LoggingSection(Section):
    """Live logs beside `train_log.jsonl` (which stays the record): scalars and sample grids for TensorBoard."""

    tensorboard: bool = Field(
        False, description="Write TensorBoard event files: loss, lr, grad norm, validation loss and sample grids (needs the "
        "`tensorboard` package)."
    )
    dir: Path | None = Field(None, description="Folder for the event files. Default: output.dir/logs.")

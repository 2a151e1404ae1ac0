"""Typed run configuration: the schema every run is validated against (reading files: `files.py`).

A run is described by one YAML or TOML file. Every field has its default in its section's module (`model.py`,
`data.py`, `training.py`, `outputs.py`), and nowhere else. Unknown keys are refused (a misspelt option must never
silently do nothing) and every error names the field, the value it got and what it accepts. The validated config is
frozen: nothing changes it after loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

# Re-exported: callers import these from sdlora.config.
from sdlora.config.data import (  # noqa: F401
    BucketSection,
    CaptionSection,
    DataSection,
    FolderSettings,
    RegularizationSection,
    SourceSection,
)
from sdlora.config.files import ConfigError, apply_overrides, explain, read_config_file
from sdlora.config.flow import FlowSection
from sdlora.config.model import (  # noqa: F401
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    LoraSection,
    ModelSection,
)
from sdlora.config.monitoring import EmaSection, LoggingSection, ValidationSection
from sdlora.config.names import public_config
from sdlora.config.outputs import HubSection, OutputSection, SampleSection
from sdlora.config.section import Section
from sdlora.config.training import SafetySection, TrainSection


class RunConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    sample: SampleSection = SampleSection()
    hub: HubSection = HubSection()
    safety: SafetySection = SafetySection()
    validation: ValidationSection = ValidationSection()
    ema: EmaSection = EmaSection()
    logging: LoggingSection = LoggingSection()
    flow: FlowSection = FlowSection()

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        if self.data.cache_text_embeddings and self.lora.train_text_encoder:
            raise ValueError(
                "data.cache_text_embeddings cannot be combined with lora.train_text_encoder (a trained text encoder "
                "changes its outputs every step): drop one of data.cache_text_embeddings or lora.train_text_encoder"
            )
        if self.output.kohya and self.lora.type != "lora":
            raise ValueError(
                f"output.kohya: a lora.type={self.lora.type} adapter is always written in the kohya/LyCORIS layout "
                "(there is no diffusers layout for it), so there is no second copy to write; remove output.kohya"
            )
        if self.model.quantize == "nf4" and self.lora.type in ("loha", "lokr"):
            raise ValueError(
                f"model.quantize=nf4: peft's {self.lora.type} reshapes its update to the base weight's shape, which "
                "nf4 stores packed; use model.quantize=int8 (tested) or none, or lora.type=lora/dora"
            )
        if self.model.quantize != "none" and self.lora.type == "dora" and self.lora.conv_rank is not None:
            raise ValueError(
                f"model.quantize={self.model.quantize}: peft's DoRA on convolutions needs their full-precision "
                "weights (it fails on a quantized base); remove lora.conv_rank, or set model.quantize=none"
            )
        if self.train.lora_plus_ratio is not None and self.lora.type in ("loha", "lokr"):
            raise ValueError(
                f"train.lora_plus_ratio: LoRA+ gives LoRA's B matrices a higher rate, and a lora.type="
                f"{self.lora.type} adapter has none; remove train.lora_plus_ratio"
            )
        if self.train.lr_warmup_steps >= self.train.steps and self.train.lr_scheduler != "constant":
            raise ValueError(
                f"train.lr_warmup_steps ({self.train.lr_warmup_steps}) must be below train.steps ({self.train.steps})"
            )
        return self

    @property
    def validates(self) -> bool:
        """A held-out set is scored: validation.path, validation.fraction or a `validation: true` data source."""
        return self.validation.enabled or bool(self.data.validation_sources())

    @model_validator(mode="after")
    def _one_held_out_set(self) -> RunConfig:
        marked = self.data.validation_sources()
        if marked:
            field = f"data.sources[{marked[0][0]}].validation"
            for option, on in (("validation.path", self.validation.path is not None),
                               ("validation.fraction", self.validation.fraction > 0)):
                if on:
                    raise ValueError(f"{field} cannot be combined with {option} (both name the held-out set): "
                                     "set one of them")
        for option, on in (("every", self.validation.every), ("keep_best", self.validation.keep_best)):
            if on and not self.validates:
                raise ValueError(f"validation.{option} needs a held-out set: set validation.path, "
                                 "validation.fraction or validation: true on a data.sources entry")
        return self

    @model_validator(mode="after")
    def _one_small_base(self) -> RunConfig:
        if self.model.quantize != "none" and self.train.weight_storage != "compute":
            raise ValueError(
                f"model.quantize ({self.model.quantize}) and train.weight_storage ({self.train.weight_storage}) "
                "both shrink the frozen weights; set one of them (weight_storage=compute or quantize=none)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, as the run folder keeps it (full local paths: resuming needs them)."""
        return json.loads(self.model_dump_json())

    def to_public_dict(self) -> dict[str, Any]:
        """`to_dict()` fit to share (adapter metadata, the config a push uploads): every local path by its final
        name only; hub ids and built-in names as they are. Every `Path` field is covered by its type, the text
        fields that may name a local file by SOURCE_FIELDS."""
        return public_config(self, self.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# Loading


def validate_config(data: dict[str, Any], source: str = "config", overrides: tuple[str, ...] = ()) -> RunConfig:
    """Validate a run config; errors name the `source` of each value, or the override among `overrides` that set it."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, source, RunConfig, overrides)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config. Relative data/output paths stay relative to the working folder."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides, RunConfig)
    return validate_config(data, source=str(path) if path is not None else "overrides", overrides=overrides)


def dump_config(config: RunConfig, public: bool = False) -> str:
    """YAML text of a validated config: what the run folder keeps next to the adapter, or with `public`, the copy
    that is shared (local paths by their final name only, see `RunConfig.to_public_dict`)."""
    return yaml.safe_dump(config.to_public_dict() if public else config.to_dict(), sort_keys=False)


def load_folder_settings(path: str | Path) -> FolderSettings:
    """Read a per-folder `dataset.toml` / `dataset.yaml`; errors name the file and the field."""
    try:
        return FolderSettings.model_validate(read_config_file(path))
    except ValidationError as exc:
        raise ConfigError(explain(exc, str(path), FolderSettings)) from None

"""The `output:`, `sample:` and `hub:` sections: what a run writes, the samples it renders, where it is shared."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from sdlora.config.names import check_repo_id
from sdlora.config.section import Section


class OutputSection(Section):
    dir: Path = Field(Path("runs/lora"), description="Run folder: adapter, checkpoints, samples, the resolved config.")
    name: str = Field("pytorch_lora_weights", description="Adapter file name, without extension.")
    kohya: bool = Field(False, description="Also write `<name>_kohya.safetensors` for AUTOMATIC1111 / Forge / ComfyUI.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"must be a plain file name without folders, got {value!r}")
        return value

    trigger_words: tuple[str, ...] = Field(
        (), description="Words that call up the LoRA; written to the adapter metadata and the model card."
    )
    recommended_weight: float = Field(
        1.0, gt=0, description="Adapter weight to recommend; written to the adapter metadata and the model card."
    )
    license: str | None = Field(
        None, description="Model card license id; default: the base's (creativeml-openrail-m for SD1, openrail++)."
    )
    base_model_id: str | None = Field(
        None, description="Hub id recorded as the card's base_model when model.base is a local folder or file."
    )

    @field_validator("base_model_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        # It is published on the card: a local path here would leak, and the Hub refuses anything but an id.
        return None if value is None else check_repo_id(value)


class SampleSection(Section):
    prompts: tuple[str, ...] = Field((), description="Prompts rendered after training (and every `every` steps).")
    every: int = Field(0, ge=0, description="Render samples every N steps while training (0: only at the end).")
    seed: int = Field(0, description="Seed for sample images (fixed so samples are comparable across steps).")
    steps: int = Field(20, ge=1, description="Denoising steps for samples.")
    guidance_scale: float = Field(7.5, ge=0.0)
    negative_prompt: str = Field("")
    adapters: tuple[str, ...] = Field(
        (), description="Other adapters stacked in the samples, as 'FILE:WEIGHT[:TEXT_ENCODER_WEIGHT]' "
        "(judge a style LoRA on the subjects it will be used with)."
    )


class HubSection(Section):
    repo_id: str | None = Field(None, description="Hub repository (user/name) that push_checkpoints uploads to.")
    private: bool = Field(False, description="Create the repository as private.")
    push_checkpoints: bool = Field(
        False, description="Upload each checkpoint, then the finished run, in the background while training."
    )

    @field_validator("repo_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @model_validator(mode="after")
    def _needs_repo(self) -> HubSection:
        if self.push_checkpoints and not self.repo_id:
            raise ValueError("hub.push_checkpoints needs hub.repo_id (user/name)")
        return self

"""Typed run configuration: the schema every run is validated against (reading files: `files.py`).

A run is described by one YAML or TOML file. Every field has its default here, in the schema, and nowhere else.
Unknown keys are refused (a misspelt option must never silently do nothing) and every error names the field,
the value it got and what it accepts. The validated config is frozen: nothing changes it after loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Re-exported: callers import these from sdlora.config.
from sdlora.config.files import ConfigError, apply_overrides, explain, read_config_file  # noqa: F401
from sdlora.config.names import check_repo_id, public_config

_SIZES_IN_EIGHTS = "Stable Diffusion pipelines take image sizes in steps of 8"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    base: str = Field(
        "sdlora:tiny",
        description="Base model: a hub id, a local diffusers folder, a single .safetensors checkpoint, "
        "or a built-in name such as 'sdlora:tiny'.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `base` is a hub id.")
    variant: str | None = Field(None, description="Weights variant to load from a hub repo or folder, e.g. 'fp16'.")
    single_file_config: str | None = Field(
        None,
        description="Local diffusers folder (or hub id) whose configs describe a single-file checkpoint; "
        "needed offline, since diffusers otherwise fetches them.",
    )
    family: Literal["sd1", "sd2", "sd2-v", "sdxl"] | None = Field(
        None,
        description="Stable Diffusion family of the base; default: detected from its components (or a single "
        "file's keys). 'sd2-v' also makes an SD2 single file predict v.",
    )
    allow_pickle: bool = Field(
        False,
        description="Allow a .ckpt/.pt/.bin single-file base (pickle). Loaded with torch.load(weights_only=True) "
        "only; off by default because a pickle file can run code.",
    )
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="Frozen-base quantization for QLoRA: int8 weight-only (optimum-quanto, CPU or GPU) or nf4 "
        "(bitsandbytes, CUDA). LoRA weights stay fp32; the adapter loads on the full-precision base.",
    )


class CaptionSection(_Section):
    """How a caption is turned into the training text; deterministic for a (seed, epoch, item)."""

    prefix: str = Field("", description="Text put before every caption (a trigger word); never shuffled or dropped.")
    suffix: str = Field("", description="Text put after every caption; never shuffled or dropped.")
    from_filename: bool = Field(False, description="Images without a caption file use their file name as caption.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags every time an image is used.")
    keep_tokens: int = Field(0, ge=0, description="Leading tags that stay in place when shuffling or dropping tags.")
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability that a caption is replaced by '' (unconditional).")
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability that each (non-kept) tag is dropped.")

    @property
    def varies(self) -> bool:
        """True when the same image gets different text in different epochs (so text cannot be cached)."""
        return self.shuffle_tags or self.dropout > 0 or self.tag_dropout > 0

    def varying_fields(self) -> list[str]:
        return [n for n, on in (("shuffle_tags", self.shuffle_tags), ("dropout", self.dropout > 0),
                                ("tag_dropout", self.tag_dropout > 0)) if on]


class SourceSection(_Section):
    """One image folder of a multi-source run. Fields set here win over the folder's dataset.toml / .yaml."""

    path: Path = Field(..., description="Image folder (searched recursively).")
    repeats: int = Field(1, ge=1, description="Times each image is used per epoch (kohya '10_name' folders set it too).")
    loss_weight: float = Field(1.0, gt=0, description="Multiplies the loss of this source's images.")
    caption_extension: str = Field(".txt", description="Sidecar caption extension ('.caption' is also read).")
    default_caption: str = Field("", description="Caption for images that have none.")
    captions: CaptionSection = CaptionSection()


class FolderSettings(_Section):
    """An optional `dataset.toml` / `dataset.yaml` inside an image folder: settings for the images below it."""

    repeats: int | None = Field(None, ge=1)
    loss_weight: float | None = Field(None, gt=0)
    caption_extension: str | None = None
    default_caption: str | None = None
    captions: CaptionSection | None = None


class BucketSection(_Section):
    enabled: bool = Field(False, description="Aspect-ratio bucketing: batches of same-shaped, uncropped-ish images.")
    step: int = Field(64, ge=8, description="Bucket sides are multiples of this (pixels; a multiple of 8).")
    min_side: int | None = Field(None, ge=8, description="Smallest bucket side. Default: resolution // 2.")
    max_side: int | None = Field(None, ge=8, description="Largest bucket side. Default: resolution * 2.")
    max_aspect: float = Field(4.0, ge=1.0, description="Largest long/short side ratio of a bucket.")
    upscale: bool = Field(False, description="Upscale images smaller than their bucket (default: use a smaller bucket).")

    @field_validator("step")
    @classmethod
    def _step_multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 ({_SIZES_IN_EIGHTS}), got {value}")
        return value


class DataSection(_Section):
    path: Path = Field(Path("datasets/demo-style"), description="Folder of images with captions (searched recursively).")
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (square crop of this side).")
    crop: Literal["center", "random"] = Field("center", description="How images are cropped to the resolution.")
    random_flip: bool = Field(False, description="Flip images horizontally at random (skip for asymmetric subjects).")
    caption_extension: str = Field(".txt", description="Extension of the sidecar caption file next to each image.")
    default_caption: str = Field("", description="Caption used for images that have none (a warning names them).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    captions: CaptionSection = Field(CaptionSection(), description="Caption options for `path` (and defaults for sources).")
    sources: tuple[SourceSection, ...] = Field((), description="Several image folders; when set, `path` is not used.")
    bucketing: BucketSection = BucketSection()
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB colour transparent images are put on.")
    cache_latents: bool = Field(False, description="Encode every image once with the VAE and train from the cache.")
    cache_text_embeddings: bool = Field(False, description="Encode every caption once and train from the cache.")
    cache_dir: Path | None = Field(None, description="Cache folder (shared across runs). Default: output.dir/cache.")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 ({_SIZES_IN_EIGHTS}), got {value}")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not value.startswith("."):
            raise ValueError(f"must start with a dot, e.g. '.txt', got {value!r}")
        return value

    def resolved_sources(self) -> tuple[SourceSection, ...]:
        """`sources`, or the single `path` folder with the data-level caption settings."""
        if self.sources:
            return self.sources
        return (SourceSection(path=self.path, caption_extension=self.caption_extension,
                              default_caption=self.default_caption, captions=self.captions),)

    @model_validator(mode="after")
    def _cacheable(self) -> DataSection:
        if self.cache_latents and self.crop == "random":
            raise ValueError(
                "data.cache_latents cannot be combined with data.crop=random (a cached latent has one fixed crop): "
                "drop data.cache_latents or set data.crop=center"
            )
        if self.cache_text_embeddings:
            named = [("data.captions", self.captions)] if not self.sources else []
            named += [(f"data.sources[{i}].captions", s.captions) for i, s in enumerate(self.sources)]
            for where, captions in named:
                if captions.varies:
                    option = f"{where}.{captions.varying_fields()[0]}"
                    raise ValueError(
                        f"data.cache_text_embeddings cannot be combined with {option} (cached text is fixed, "
                        f"{option} changes it every epoch): drop one of data.cache_text_embeddings or {option}"
                    )
        return self


UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoraSection(_Section):
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    unet_targets: tuple[str, ...] = Field(UNET_ATTENTION_TARGETS, description="UNet module names that get LoRA.")
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder.")
    text_encoder_targets: tuple[str, ...] = Field(
        TEXT_ENCODER_ATTENTION_TARGETS, description="Text-encoder module names that get LoRA."
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @field_validator("unet_targets", "text_encoder_targets")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one module, e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']")
        return value


class TrainSection(_Section):
    steps: int = Field(1000, ge=1, description="Optimizer steps to train for.")
    batch_size: int = Field(1, ge=1, description="Images per device per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate of the UNet LoRA.")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="Text-encoder LoRA LR. Default: learning_rate.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule (diffusers' get_scheduler names).")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes (CUDA).")
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999))
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "no", description="Compute dtype of the frozen weights; auto: bf16 or fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="xformers is used only when installed on CUDA.")
    seed: int = Field(42, description="Seed for LoRA init, data order, crops, noise and timesteps.")
    noise_offset: float = Field(0.0, ge=0.0, description="Noise offset (Guttenberg 2023); ~0.05 helps very dark/light images.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is typical.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Training target; default: the base scheduler's prediction_type."
    )
    checkpoint_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep (oldest are deleted).")
    zero_terminal_snr: bool = Field(
        False, description="Rescale the noise schedule to zero terminal SNR (Lin et al. 2024); v-prediction only."
    )
    weight_storage: Literal["compute", "bf16", "fp8"] = Field(
        "compute", description="Dtype the frozen weights are stored in; each layer upcasts to the compute dtype."
    )
    channels_last: bool = Field(False, description="UNet convolutions in channels-last memory format.")
    compile: bool = Field(False, description="torch.compile the UNet (slow first step; faster later ones).")
    retain_host_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="Keep freed CPU memory in the process (glibc) so steps stop page-faulting it back; "
        "auto: unless a memory saver (checkpointing, smaller weight storage, quantized base) is on."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` in a file or on the command line means fp32.
        return "no" if value is False else value


class OutputSection(_Section):
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


class SampleSection(_Section):
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


class HubSection(_Section):
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


class SafetySection(_Section):
    nan_patience: int = Field(3, ge=1, description="Non-finite steps in a row (each skipped) before a rollback.")
    nan_lr_factor: float = Field(0.5, gt=0, lt=1, description="Learning-rate multiplier applied on each rollback.")
    nan_max_rollbacks: int = Field(
        2, ge=0, description="Rollbacks to the last good checkpoint before the run stops with a diagnosis."
    )


class RunConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    sample: SampleSection = SampleSection()
    hub: HubSection = HubSection()
    safety: SafetySection = SafetySection()

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        if self.data.cache_text_embeddings and self.lora.train_text_encoder:
            raise ValueError(
                "data.cache_text_embeddings cannot be combined with lora.train_text_encoder (a trained text encoder "
                "changes its outputs every step): drop one of data.cache_text_embeddings or lora.train_text_encoder"
            )
        if self.train.lr_warmup_steps >= self.train.steps and self.train.lr_scheduler != "constant":
            raise ValueError(
                f"train.lr_warmup_steps ({self.train.lr_warmup_steps}) must be below train.steps ({self.train.steps})"
            )
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

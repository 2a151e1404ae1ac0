"""The `data:` section: the image folders, how captions become text, crops, buckets and caches."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdlora.config.section import SIZES_IN_EIGHTS, Section

# Adapters are stacked at weights from about -2 to 2 (sliders: -1..1); ten times that is a typo, not a dial.
MAX_ADAPTER_WEIGHT = 10.0
ZERO_WEIGHT = "0 trains nothing (the adapter is off at weight 0): use a weight such as 0.25, or drop the images"


class CaptionSection(Section):
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


class SourceSection(Section):
    """One image folder of a multi-source run. Fields set here win over the folder's dataset.toml / .yaml."""

    path: Path = Field(..., description="Image folder (searched recursively).")
    repeats: int = Field(1, ge=1, description="Times each image is used per epoch (kohya '10_name' folders set it too).")
    loss_weight: float = Field(1.0, gt=0, description="Multiplies the loss of this source's images.")
    adapter_weight: float = Field(
        1.0, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, description="The adapter weight this source's images are "
        "trained at (1.0: as usual). Images of a weaker effect at a lower weight (and of the opposite effect at a "
        "negative one) make the weight a dial, as a slider LoRA: see docs/steering.md, 'A weight that works as a dial'."
    )
    caption_extension: str = Field(".txt", description="Sidecar caption extension ('.caption' is also read).")
    default_caption: str = Field("", description="Caption for images that have none.")
    captions: CaptionSection = CaptionSection()
    regularization: bool = Field(
        False, description="Regularization (prior-preservation) images: mixed in at data.regularization.ratio, "
        "their loss scaled by data.regularization.prior_loss_weight. Caption them with the class prompt."
    )
    validation: bool = Field(
        False, description="Held-out images: never trained on, scored as the validation loss (instead of "
        "validation.path or validation.fraction; see the `validation:` section for when and how)."
    )

    @field_validator("adapter_weight")
    @classmethod
    def _weight_trains_something(cls, value: float) -> float:
        if value == 0:
            raise ValueError(ZERO_WEIGHT)
        return value


class RegularizationSection(Section):
    """How regularization sources (`data.sources[*].regularization: true`) are mixed into training."""

    ratio: float = Field(
        0.5, gt=0, lt=1, description="Share of each epoch's samples drawn from regularization sources (0.5: one "
        "regularization image per training image, as DreamBooth). Each epoch takes the next regularization images "
        "in a seeded order, so a large class folder is used in full over the epochs."
    )
    prior_loss_weight: float = Field(1.0, gt=0, description="Multiplies the loss of regularization samples only.")


class FolderSettings(Section):
    """An optional `dataset.toml` / `dataset.yaml` inside an image folder: settings for the images below it."""

    repeats: int | None = Field(None, ge=1)
    loss_weight: float | None = Field(None, gt=0)
    adapter_weight: float | None = Field(None, ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT)
    caption_extension: str | None = None
    default_caption: str | None = None
    captions: CaptionSection | None = None

    @field_validator("adapter_weight")
    @classmethod
    def _weight_trains_something(cls, value: float | None) -> float | None:
        if value == 0:
            raise ValueError(ZERO_WEIGHT)
        return value


# The largest training side accepted. SD1.x trains at 512, SD2 at 768, SDXL at 1024; 4096 is four times SDXL's side,
# 16x its memory per image. A larger value is a typo (1000000000 passed and died later in a MemoryError).
MAX_RESOLUTION = 4096


class BucketSection(Section):
    enabled: bool = Field(False, description="Aspect-ratio bucketing: batches of same-shaped, uncropped-ish images.")
    step: int = Field(64, ge=8, description="Bucket sides are multiples of this (pixels; a multiple of 8).")
    min_side: int | None = Field(None, ge=8, le=2 * MAX_RESOLUTION,
                                 description="Smallest bucket side. Default: resolution // 2.")
    max_side: int | None = Field(None, ge=8, le=2 * MAX_RESOLUTION,
                                 description="Largest bucket side. Default: resolution * 2.")
    max_aspect: float = Field(4.0, ge=1.0, description="Largest long/short side ratio of a bucket.")
    upscale: bool = Field(False, description="Upscale images smaller than their bucket (default: use a smaller bucket).")

    @field_validator("step")
    @classmethod
    def _step_multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 ({SIZES_IN_EIGHTS}), got {value}")
        return value


class DataSection(Section):
    path: Path = Field(Path("datasets/demo-style"), description="Folder of images with captions (searched recursively).")
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (square crop of this side); at "
                            f"most {MAX_RESOLUTION}.")
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
    regularization: RegularizationSection = RegularizationSection()
    masked_loss: bool = Field(
        False, description="Weight the loss per pixel by a mask: `<image stem>-masklabel.png` beside an image "
        "(OneTrainer's name; white trains, black is ignored). Images without one train unmasked (or see "
        "mask_from_alpha)."
    )
    mask_from_alpha: bool = Field(
        False, description="With masked_loss: an image with an alpha channel and no mask file uses its alpha as mask."
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value > MAX_RESOLUTION:
            raise ValueError(f"must be at most {MAX_RESOLUTION} pixels per side, got {value}: SD1.x trains at 512, "
                             "SDXL at 1024, and memory grows with the square of the side")
        if value % 8:
            raise ValueError(f"must be a multiple of 8 ({SIZES_IN_EIGHTS}), got {value}")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not value.startswith("."):
            raise ValueError(f"must start with a dot, e.g. '.txt', got {value!r}")
        return value

    def resolved_sources(self) -> tuple[SourceSection, ...]:
        """The sources trained on: `sources` less those marked `validation`, or the single `path` folder with the
        data-level caption settings."""
        if self.sources:
            return tuple(source for source in self.sources if not source.validation)
        return (SourceSection(path=self.path, caption_extension=self.caption_extension,
                              default_caption=self.default_caption, captions=self.captions),)

    def validation_sources(self) -> list[tuple[int, SourceSection]]:
        """The `sources` marked `validation: true`, with their index (for messages naming the field)."""
        return [(number, source) for number, source in enumerate(self.sources) if source.validation]

    @model_validator(mode="after")
    def _something_to_learn(self) -> DataSection:
        for number, source in enumerate(self.sources):
            if (source.regularization or source.validation) and source.adapter_weight != 1.0:
                kind = "regularization images are trained" if source.regularization else "held-out images are scored"
                raise ValueError(
                    f"data.sources[{number}].adapter_weight: {kind} at weight 1.0; drop adapter_weight from this "
                    "source"
                )
            if source.regularization and source.validation:
                raise ValueError(
                    f"data.sources[{number}].regularization cannot be combined with data.sources[{number}].validation "
                    "(a held-out image is never trained on, a regularization image is): set one of them"
                )
        if self.sources and all(source.regularization or source.validation for source in self.sources):
            raise ValueError("data.sources: every source has regularization: true or validation: true; mark the "
                             "images to learn with neither (the default)")
        return self

    @model_validator(mode="after")
    def _cacheable(self) -> DataSection:
        if self.cache_latents and self.crop == "random":
            raise ValueError(
                "data.cache_latents cannot be combined with data.crop=random (a cached latent has one fixed crop): "
                "drop data.cache_latents or set data.crop=center"
            )
        if self.mask_from_alpha and not self.masked_loss:
            raise ValueError("data.mask_from_alpha needs data.masked_loss: set data.masked_loss=true or drop "
                             "data.mask_from_alpha")
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

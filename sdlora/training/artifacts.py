"""What a run hands to people: the adapter file (tensors + provenance metadata) and preview sample grids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdlora import formats, inference
from sdlora.config import RunConfig, SampleSection
from sdlora.config.names import public_name
from sdlora.files.atomic import atomic_path
from sdlora.formats import lycoris_write
from sdlora.formats import metadata as adapter_metadata
from sdlora.formats.validate import check_fits
from sdlora.models import BaseModel, families
from sdlora.training import distributed, offload
from sdlora.training.folder import RunFolder


def adapter_file(accelerator, trained_models: dict[str, torch.nn.Module], config: RunConfig, base: BaseModel,
                 prediction_type: str, records) -> formats.AdapterFile:
    """The trained LoRA with its metadata. Call on every process: gathering under FSDP / DeepSpeed is collective.

    The file is made to be shared, so its metadata names the base by hub id or built-in name, a local base by its
    folder or file name, and records the config with every local path cut to its final name."""
    tensors = {name: distributed.lora_tensors(accelerator, model) for name, model in trained_models.items()}
    section = config.lora
    alpha = section.effective_alpha
    if section.type == "lora" and section.conv_rank is None:
        shapes = {component: formats.shape_from_tensors(t, alpha) for component, t in tensors.items()}
    else:  # the type's own tensors (hada_*, lokr_*, lora_magnitude_vector) and LoCon's conv ranks and alphas
        shapes = {component: lycoris_write.trained_shape(
            t, kind=section.type, rank=section.rank, alpha=alpha, dropout=section.dropout,
            conv_rank=section.conv_rank if component == "unet" else None, conv_alpha=section.effective_conv_alpha,
            factor=section.factor, decompose_both=section.decompose_both) for component, t in tensors.items()}
    metadata = {
        "sdlora.base_model": public_name(base.source),
        "sdlora.family": base.family,
        "sdlora.prediction_type": prediction_type,
        "sdlora.rank": str(config.lora.rank),
        "sdlora.alpha": str(alpha),
        "sdlora.adapter_type": section.type,
        **({"sdlora.conv_rank": str(section.conv_rank), "sdlora.conv_alpha": str(section.effective_conv_alpha)}
           if section.conv_rank is not None else {}),
        "sdlora.training_config": json.dumps(config.to_public_dict(), sort_keys=True),
        **families.adapter_metadata(base.family, prediction_type, config.data.resolution),
    }
    metadata.update(adapter_metadata.provenance(
        base_source=base.source, records=records, trigger_words=config.output.trigger_words,
        recommended_weight=config.output.recommended_weight, folder_name=Path(config.data.path).name,
    ))
    return formats.AdapterFile(tensors=tensors, shapes=shapes, metadata=metadata)


@dataclass
class SampleRenderer:
    """Renders `sample.prompts` with the adapter as it is at a step, as one PNG grid (main process only)."""

    sample: SampleSection
    resolution: int
    base: BaseModel  # the frozen parts (VAE, tokenizers, scheduler, SDXL's second encoder)
    unet: torch.nn.Module  # the training UNet and text encoder, unwrapped from accelerate's wrappers
    text_encoder: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    folder: RunFolder

    def __post_init__(self):
        # Parsed, read and fitted to the base now, at setup: a typo, a damaged file or an adapter for another family
        # in sample.adapters fails before training, not at the first sample step an hour later.
        self.adapters = [inference.AdapterSpec.parse(text, option="sample.adapters") for text in self.sample.adapters]
        models = {self.base.denoiser_component: self.unet, "text_encoder": self.text_encoder,
                  "text_encoder_2": self.base.text_encoder_2}
        models = {name: module for name, module in models.items() if module is not None}
        for spec in self.adapters:
            adapter = formats.read_adapter(spec.source)
            check_fits(f"sample.adapters {spec.source}", adapter, models, self.base.family)

    def render(self, step: int) -> Path | None:
        sample, base = self.sample, self.base
        if not sample.prompts:
            return None
        # A cached run may have parked its frozen text encoders in CPU memory: borrow them back for the samples.
        encoders = [e for e in (self.text_encoder, base.text_encoder_2, base.text_encoder_3) if e is not None]
        with offload.borrowed(encoders, self.device):
            view = BaseModel(unet=self.unet, vae=base.vae, text_encoder=self.text_encoder, tokenizer=base.tokenizer,
                             scheduler=base.scheduler, source=base.source,
                             text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                             text_encoder_3=base.text_encoder_3, tokenizer_3=base.tokenizer_3)
            pipe = inference.build_pipeline(view, device=self.device, dtype=self.dtype)
            self.unet.eval()
            images = []
            with inference.preview_adapters(pipe, self.adapters):
                for prompt in sample.prompts:
                    images += inference.generate(
                        pipe, prompt, seed=sample.seed, steps=sample.steps, guidance_scale=sample.guidance_scale,
                        negative_prompt=sample.negative_prompt, height=self.resolution, width=self.resolution,
                    )
        self.unet.train()
        grid = sample_sheet(images, list(sample.prompts))
        path = self.folder.sample_grid(step)
        with atomic_path(path) as tmp:  # a full disk mid-PNG leaves no half image
            grid.save(tmp, format="PNG")
        return path


SAMPLE_MIN_CELL = 192  # px: smaller samples are enlarged to at least this for the sample grid


def sample_sheet(images: list, prompts: list[str]):
    """The sample grid of one step: a picture per prompt under its prompt. Pictures smaller than SAMPLE_MIN_CELL
    (a 64 px demo base's) are enlarged by a whole factor, nearest neighbour, so each pixel stays a visible block and
    the prompt fits above it: pasted as they are, the prompt was cut to "a red circle on a blue backgroun..." over a
    picture a third its height."""
    factor = max(1, -(-SAMPLE_MIN_CELL // images[0].width))
    if factor > 1:
        images = [image.resize((image.width * factor, image.height * factor), Image.NEAREST) for image in images]
    return inference.image_grid(images, columns=len(images), column_labels=prompts)

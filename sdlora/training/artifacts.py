"""What a run hands to people: the adapter file (tensors + provenance metadata) and preview sample grids.

Functions of a built `run.TrainingRun`; the loop never calls them directly, the run's hooks do.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.config.names import public_name
from sdlora.training import distributed
from sdlora.models import families
from sdlora import formats
from sdlora import inference
from sdlora.training import offload
from sdlora.formats import metadata as adapter_metadata
from sdlora.models import BaseModel


def adapter_file(run) -> formats.AdapterFile:
    """The trained LoRA with its metadata. Call on every process: gathering under FSDP / DeepSpeed is collective.

    The file is made to be shared, so its metadata names the base by hub id or built-in name, a local base by its
    folder or file name, and records the config with every local path cut to its final name."""
    cfg = run.config
    tensors = {name: distributed.lora_tensors(run.accelerator, m) for name, m in run.trained_models.items()}
    shapes = {c: formats.shape_from_tensors(t, cfg.lora.effective_alpha) for c, t in tensors.items()}
    metadata = {
        "sdlora.base_model": public_name(run.base.source),
        "sdlora.family": run.base.family,
        "sdlora.prediction_type": run.parts.prediction_type,
        "sdlora.rank": str(cfg.lora.rank),
        "sdlora.alpha": str(cfg.lora.effective_alpha),
        "sdlora.training_config": json.dumps(cfg.to_public_dict(), sort_keys=True),
        **families.adapter_metadata(run.base.family, run.parts.prediction_type, cfg.data.resolution),
    }
    metadata.update(adapter_metadata.provenance(
        base_source=run.base.source, records=run.records, trigger_words=cfg.output.trigger_words,
        recommended_weight=cfg.output.recommended_weight, folder_name=Path(cfg.data.path).name,
    ))
    return formats.AdapterFile(tensors=tensors, shapes=shapes, metadata=metadata)


def render_samples(run, step: int) -> Path | None:
    """The sample prompts rendered with the adapter as it is now (main process only), as one PNG grid."""
    sample = run.config.sample
    if not sample.prompts or not run.accelerator.is_main_process:
        return None
    unet = run.accelerator.unwrap_model(run.parts.unet)
    text_encoder = run.accelerator.unwrap_model(run.parts.text_encoder)
    # A cached run may have parked its frozen text encoders in CPU memory: borrow them back for the samples.
    encoders = [e for e in (text_encoder, run.base.text_encoder_2) if e is not None]
    with offload.borrowed(encoders, run.accelerator.device):
        view = BaseModel(unet=unet, vae=run.base.vae, text_encoder=text_encoder, tokenizer=run.base.tokenizer,
                         scheduler=run.base.scheduler, source=run.base.source,
                         text_encoder_2=run.base.text_encoder_2, tokenizer_2=run.base.tokenizer_2)
        pipe = inference.build_pipeline(view, device=run.accelerator.device, dtype=run.weight_dtype)
        unet.eval()
        images = []
        with inference.preview_adapters(pipe, [inference.AdapterSpec.parse(a) for a in sample.adapters]):
            for prompt in sample.prompts:
                images += inference.generate(
                    pipe, prompt, seed=sample.seed, steps=sample.steps, guidance_scale=sample.guidance_scale,
                    negative_prompt=sample.negative_prompt, height=run.config.data.resolution,
                    width=run.config.data.resolution,
                )
    unet.train()
    grid = inference.image_grid(images, columns=len(images), column_labels=[p[:24] for p in sample.prompts])
    path = run.output_dir / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

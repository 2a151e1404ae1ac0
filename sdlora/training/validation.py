"""Validation loss: a held-out set scored with the training objective, at fixed noise and fixed timesteps.

Each held-out image gets its latent draw and its noise once, at setup, from a generator of its own seeded by
`validation.seed`, and is scored at `validation.timesteps` timesteps spread evenly over the schedule. Nothing in a
score is random, so the number moves only when the weights do: it compares across steps, across runs with the same
seed, and across a resume. Scoring runs with every trained model in eval mode (no LoRA dropout) and inside
`rng.isolated()`, so a run that validates draws exactly what one that does not would: the training trajectory is
the same with or without it.

The held-out images are never trained on: a `fraction` is split off the training records (by content hash, so the
choice depends on the seed and the images, not on file names or folder order), and a `path` folder or a
`data.sources` entry marked `validation: true` (left out of the training sources by the config) that shares an image
with the training data is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sdlora import rng
from sdlora.config import RunConfig
from sdlora.config.data import DataSection
from sdlora.config.monitoring import ValidationSection
from sdlora.data import CaptionedImageDataset, DatasetError, ImageRecord, collate, preflight
from sdlora.training import diffusion
from sdlora.training.loop import TrainingParts

log = logging.getLogger(__name__)

Bucket = tuple[int, int]


@dataclass
class HeldOut:
    """The training records (what the run trains on) and the held-out ones (empty when validation is off)."""

    train_records: list[ImageRecord]
    train_buckets: list[Bucket]
    records: list[ImageRecord]
    buckets: list[Bucket]


def split(config: RunConfig, report: preflight.PreflightReport, num_processes: int = 1) -> HeldOut:
    """Hold out `validation.fraction` of the checked training images, or read the `validation.path` folder."""
    section = config.validation
    records, buckets = list(report.records), list(report.buckets)
    if config.data.validation_sources():
        return _marked_sources(config, records, buckets)
    if not section.enabled:
        return HeldOut(records, buckets, [], [])
    if section.path is not None:
        return _folder(config, records, buckets)
    count = max(1, round(section.fraction * len(records)))
    # Ranked by a hash of (seed, image content): the same images are held out whatever their names or order.
    ranked = sorted(range(len(records)),
                    key=lambda i: hashlib.sha256(f"{section.seed}:{records[i].content_hash}".encode()).hexdigest())
    held = set(ranked[:count])
    kept = [i for i in range(len(records)) if i not in held]
    items = sum(records[i].repeats for i in kept)
    needed = config.train.batch_size * num_processes
    if items < needed:
        raise DatasetError(
            f"validation.fraction={section.fraction}: holding out {count} of {len(records)} images leaves {items} "
            f"training item(s), fewer than one batch ({needed}); lower validation.fraction or train.batch_size, "
            "or give a separate folder as validation.path"
        )
    chosen = sorted(held)
    return HeldOut([records[i] for i in kept], [buckets[i] for i in kept],
                   [records[i] for i in chosen], [buckets[i] for i in chosen])


def _folder(config: RunConfig, records: list[ImageRecord], buckets: list[Bucket]) -> HeldOut:
    path = config.validation.path
    data = config.data.model_copy(update={"path": path, "sources": (), "cache_text_embeddings": False})
    return _checked(data, "validation.path", path, records, buckets)


def _marked_sources(config: RunConfig, records: list[ImageRecord], buckets: list[Bucket]) -> HeldOut:
    """The `data.sources` entries with `validation: true`, each read with its own settings, as the held-out set."""
    marked = config.data.validation_sources()
    where = ", ".join(f"data.sources[{number}]" for number, _ in marked)
    for number, source in marked:
        if not source.path.is_dir():
            raise DatasetError(f"data.sources[{number}].path: {source.path} is not a folder")
    # Unmarked, they are what resolved_sources() returns for this one check.
    unmarked = tuple(source.model_copy(update={"validation": False}) for _, source in marked)
    data = config.data.model_copy(update={"sources": unmarked, "cache_text_embeddings": False})
    return _checked(data, where, ", ".join(str(s.path) for _, s in marked), records, buckets)


def _checked(data: DataSection, where: str, path: object, records: list[ImageRecord], buckets: list[Bucket]) -> HeldOut:
    report = preflight.check(data)
    if not report.records:
        raise DatasetError(f"{where}: no usable images in {path} (run `sdlora dataset check {path}`)")
    trained = {r.content_hash: r.path for r in records}
    for record in report.records:
        if record.content_hash in trained:
            raise DatasetError(
                f"{where}: {record.path} is the same image as the training image {trained[record.content_hash]}"
                "; a held-out image must never be trained on: remove it from one of the two folders"
            )
    return HeldOut(records, buckets, list(report.records), list(report.buckets))


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class _Item:
    latents: torch.Tensor  # [1, C, h, w], scaled, CPU: the image's one fixed latent draw
    noise: torch.Tensor  # [timesteps, C, h, w], CPU
    batch: dict[str, Any]  # collated item; carries its text states when the text encoders are frozen


def evenly_spaced_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """The middle of each of `count` equal slices of the schedule: [0, T) covered without favouring either end."""
    return torch.tensor([int((j + 0.5) * num_train_timesteps / count) for j in range(count)], dtype=torch.long)


class Validator:
    """Scores the held-out set; build it after the models are prepared and before a cached run frees its encoders
    (`prepare` encodes every held-out image and, with frozen text encoders, every caption once)."""

    def __init__(self, section: ValidationSection, items: list[_Item], timesteps: torch.Tensor):
        self.section = section
        self.items = items
        self.timesteps = timesteps

    @classmethod
    def prepare(cls, config: RunConfig, held_out: HeldOut, parts: TrainingParts) -> Validator:
        section, data = config.validation, config.data
        # Fixed captions: a held-out caption is never dropped or shuffled (prefix and suffix stay).
        fixed = [replace(r, repeats=1, captions=r.captions.model_copy(
            update={"dropout": 0.0, "tag_dropout": 0.0, "shuffle_tags": False})) for r in held_out.records]
        dataset = CaptionedImageDataset(fixed, data.resolution, "center", False, section.seed,
                                        buckets=held_out.buckets, background=data.background)
        scheduler = parts.noise_scheduler
        timesteps = evenly_spaced_timesteps(section.timesteps, scheduler.config.num_train_timesteps)
        generator = torch.Generator().manual_seed(section.seed)  # its own stream: no global RNG is touched
        vae, device = parts.vae, parts.accelerator.device
        items = []
        with torch.no_grad():
            for index in range(len(dataset)):
                batch = collate([dataset[(0, index)]])
                dist = vae.encode(batch.pop("pixel_values").to(device, dtype=vae.dtype)).latent_dist
                mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
                latents = (mean + std * torch.randn(mean.shape, generator=generator)) * vae.config.scaling_factor
                noise = diffusion.sample_noise(latents.expand(len(timesteps), -1, -1, -1), generator,
                                               parts.noise_offset)
                if not parts.train_text_encoder:
                    batch.update({k: v.cpu() for k, v in parts.conditioning.encode_text(batch["captions"]).items()})
                items.append(_Item(latents, noise, batch))
        log.info("validation: %d held-out image(s), each at timesteps %s", len(items), timesteps.tolist())
        return cls(section, items, timesteps)

    def score(self, parts: TrainingParts) -> float:
        """Mean loss over the held-out set. Call on every process (a sharded model's forward is collective)."""
        models = parts.trained_models or (
            (parts.unet, parts.text_encoder) if parts.train_text_encoder else (parts.unet,))
        with torch.no_grad(), rng.isolated(), eval_mode(models):
            losses = [self._item_loss(parts, item) for item in self.items]
        return float(sum(losses) / len(losses))

    def _item_loss(self, parts: TrainingParts, item: _Item) -> float:
        device, dtype, count = parts.accelerator.device, parts.weight_dtype, len(self.timesteps)
        latents = item.latents.to(device).repeat(count, 1, 1, 1)
        noise, timesteps = item.noise.to(device), self.timesteps.to(device)
        states, added = parts.conditioning(item.batch)
        states = states.repeat(count, 1, 1).to(dtype)
        if added is not None:
            added = {key: value.repeat(count, *([1] * (value.ndim - 1))).to(dtype) for key, value in added.items()}
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        with parts.accelerator.autocast():
            prediction = parts.unet(noisy.to(dtype), timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
        target = diffusion.training_target(parts.noise_scheduler, latents, noise, timesteps, parts.prediction_type)
        return diffusion.diffusion_loss(prediction, target, timesteps, parts.noise_scheduler, parts.prediction_type,
                                        parts.snr_gamma).item()


@contextlib.contextmanager
def eval_mode(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode (no dropout), then each put back exactly as it was (frozen parts stay eval)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training

"""Disk caches of VAE latents and text-encoder outputs, one safetensors file per entry.

A latent entry is keyed by a hash of the image's content, the size it is resized to, the crop, the flip, the
background colour and the encoder's fingerprint; a text entry by the final caption text and the text encoder's
fingerprint. Any change to an input gives a new key, so only the affected entries are encoded again, and unchanged
entries are reused by later runs that point at the same folder. The encoders are passed in as callables: this
module never imports diffusers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.data.dataset import CaptionedImageDataset
from sdlora.data.images import load_rgb
from sdlora.data.masks import mask_fingerprint
from sdlora.data.sources import ImageRecord
from sdlora.data.transforms import Placement, apply_placement, plan_crop
from sdlora.files.atomic import save_safetensors_atomic

log = logging.getLogger(__name__)

LatentEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels -> (mean, std)
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]  # captions -> named conditioning tensors


def module_fingerprint(module: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap identity for frozen weights: names, shapes, dtypes and the first values of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        flat = tensor.detach().reshape(-1)[:sample].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _EntryStore:
    def __init__(self, folder: Path, kind: str, model_key: str):
        self.folder, self.kind, self.model_key = Path(folder) / kind, kind, model_key

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors_atomic(tensors, self.path(key), {"sdlora.cache": self.kind, "sdlora.model": self.model_key})


class LatentCache(_EntryStore):
    def __init__(self, folder: Path, model_key: str, background: tuple[int, int, int]):
        super().__init__(folder, "latents", model_key)
        self.background = background

    def key(self, record: ImageRecord, resized: tuple[int, int], placement: Placement, flipped: bool) -> str:
        return _key(content=record.content_hash, resized=resized, crop=placement.crop_top_left,
                    target=placement.target_size, flip=flipped, background=self.background, model=self.model_key)

    def load(self, record: ImageRecord, resized: tuple[int, int], placement: Placement):
        entry = load_file(self.path(self.key(record, resized, placement, placement.flipped)))
        return entry["mean"], entry["std"]


class MaskCache(_EntryStore):
    """Loss masks placed like their cached latents (same resize, crop and flip), keyed by the mask's own bytes."""

    def __init__(self, folder: Path):
        super().__init__(folder, "masks", "")

    def key(self, fingerprint: str, resized: tuple[int, int], placement: Placement, flipped: bool) -> str:
        return _key(mask=fingerprint, resized=resized, crop=placement.crop_top_left, target=placement.target_size,
                    flip=flipped)

    def load(self, fingerprint: str, resized: tuple[int, int], placement: Placement, flipped: bool) -> torch.Tensor:
        return load_file(self.path(self.key(fingerprint, resized, placement, flipped)))["mask"].float() / 255.0


def fill_masks(dataset: CaptionedImageDataset, cache: MaskCache, share: Callable = list) -> None:
    """Place every mask the latent jobs can ask for, stored as uint8 (a mask is 8-bit to begin with)."""
    dataset.mask_fingerprints = {
        index: mask_fingerprint(record.path, record.mask, dataset.mask_from_alpha)
        for index, record in enumerate(dataset.records)
    }
    for index, resized, placement, flip in share(list(_placements(dataset))):
        fingerprint = dataset.mask_fingerprints[index]
        path = cache.path(cache.key(fingerprint, resized, placement, flip))
        if fingerprint and not path.is_file():
            mask = dataset.placed_mask(index, dataset.records[index].size, resized, placement, flip)
            cache.save(cache.key(fingerprint, resized, placement, flip),
                       {"mask": (mask * 255.0).round().to(torch.uint8)})


class TextCache(_EntryStore):
    def __init__(self, folder: Path, model_key: str):
        super().__init__(folder, "text", model_key)

    def key(self, caption: str) -> str:
        return _key(caption=caption, model=self.model_key)

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        """The text conditioning tensors stored for a caption (SDXL: states and pooled embedding)."""
        return load_file(self.path(self.key(caption)))


@dataclass
class CacheStats:
    latents_reused: int = 0
    latents_encoded: int = 0
    text_reused: int = 0
    text_encoded: int = 0


def _placements(dataset: CaptionedImageDataset):
    """Every (record, resize, placement, flip) the dataset can ask for: center crops, both flips when flipping."""
    flips = (False, True) if dataset.flip_probability > 0 else (False,)
    for index, record in enumerate(dataset.records):
        resized, placement = plan_crop(record.size, dataset.targets[index], "center", random.Random(0), 0.0)
        for flip in flips:
            yield index, resized, placement, flip


def _latent_jobs(dataset: CaptionedImageDataset, cache: LatentCache):
    for index, resized, placement, flip in _placements(dataset):
        yield cache.key(dataset.records[index], resized, placement, flip), index, resized, placement, flip


def fill_latents(dataset: CaptionedImageDataset, cache: LatentCache, encode: LatentEncoder, batch_size: int,
                 stats: CacheStats, progress: Callable | None = None, share: Callable = list) -> None:
    # Shard the full job list (stable on every process), not the missing ones: another process may already be
    # writing, so lists of what is missing could differ between processes and leave entries to nobody.
    jobs = share(list({key: job for key, *job in _latent_jobs(dataset, cache)}.items()))
    missing = [(key, job) for key, job in jobs if not cache.path(key).is_file()]
    stats.latents_reused += len(jobs) - len(missing)
    # Batches are formed per target size so each encoder call gets one tensor shape.
    by_shape: dict[tuple[int, int], list] = {}
    for key, job in missing:
        by_shape.setdefault(job[2].target_size, []).append((key, job))
    bar = progress(total=len(missing), desc="caching latents") if progress and missing else None
    for group in by_shape.values():
        for begin in range(0, len(group), batch_size):
            chunk = group[begin : begin + batch_size]
            pixels = torch.stack([
                apply_placement(load_rgb(dataset.records[i].path, cache.background), resized, placement, flip)
                for _, (i, resized, placement, flip) in chunk
            ])
            with torch.no_grad():
                mean, std = encode(pixels)
            for row, (key, _) in enumerate(chunk):
                cache.save(key, {"mean": mean[row], "std": std[row]})
            stats.latents_encoded += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()


def fill_text(dataset: CaptionedImageDataset, cache: TextCache, encode: TextEncoder, batch_size: int,
              stats: CacheStats, progress: Callable | None = None, share: Callable = list) -> None:
    # Caption options that vary per epoch are refused with a text cache, so epoch 0 gives every caption there is.
    captions = share(sorted(dataset.fixed_captions()))
    missing = [c for c in captions if not cache.path(cache.key(c)).is_file()]
    stats.text_reused += len(captions) - len(missing)
    bar = progress(total=len(missing), desc="caching text") if progress and missing else None
    for begin in range(0, len(missing), batch_size):
        chunk = missing[begin : begin + batch_size]
        with torch.no_grad():
            outputs = encode(chunk)
        for row, caption in enumerate(chunk):
            cache.save(cache.key(caption), {name: tensor[row] for name, tensor in outputs.items()})
        stats.text_encoded += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def attach_caches(
    dataset: CaptionedImageDataset, folder: Path, *, latent_encoder: LatentEncoder | None = None,
    latent_model_key: str = "", text_encoder: TextEncoder | None = None, text_model_key: str = "",
    batch_size: int = 8, progress: Callable | None = None, share: Callable = list, barrier: Callable = lambda: None,
) -> CacheStats:
    """Encode what is not cached yet, then make the dataset read from the caches; returns what was reused.

    With several processes, `share` picks this process's part of the missing entries (no file is written by two
    processes) and `barrier` waits for all of them before anyone reads the cache.
    """
    stats = CacheStats()
    latents = text = None
    if latent_encoder is not None:
        latents = LatentCache(folder, latent_model_key, dataset.background)
        fill_latents(dataset, latents, latent_encoder, batch_size, stats, progress, share)
        if dataset.masked:
            masks = MaskCache(folder)
            fill_masks(dataset, masks, share)
    if text_encoder is not None:
        text = TextCache(folder, text_model_key)
        fill_text(dataset, text, text_encoder, batch_size, stats, progress, share)
    barrier()
    if latents is not None:
        dataset.latent_cache = latents
        if dataset.masked:
            dataset.mask_cache = masks
    if text is not None:
        dataset.text_cache = text
    log.info("cache %s: latents %d reused, %d encoded; text %d reused, %d encoded", folder, stats.latents_reused,
             stats.latents_encoded, stats.text_reused, stats.text_encoded)
    return stats

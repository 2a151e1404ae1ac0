"""Free the encoders a cached run no longer needs, so the training step holds only the UNet (and its LoRA).

Once every latent and caption is in the cache, the VAE encoder and the frozen text encoders do no work for the
rest of the run. What still needs them decides what happens:
- nothing (no sample prompts): their weights go to the meta device. That frees the memory on any device, and a
  forward that still reached them would fail loudly instead of silently costing time. The VAE encoder is freed
  in every case (only training images go through it).
- sample prompts: the VAE decoder is kept; frozen text encoders on a GPU wait in CPU memory and are borrowed back
  onto the device for the few seconds samples take (`borrowed`); on a CPU they stay where they are.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

META = torch.device("meta")


class Released(torch.nn.Module):
    """Stands where a freed part of a model was: no weights, so the model can still move between devices, and a
    clear error if anything calls it."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} was released after caching; it cannot run in this training process")


def _size(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if not t.is_meta)


def _release(module: torch.nn.Module, device: torch.device) -> int:
    size = _size(module)
    if device.type == "meta":
        _to_meta(module)
    else:
        module.to(device)
    return size


def _to_meta(module: torch.nn.Module) -> None:
    """Every parameter and buffer replaced by a meta tensor of its shape and dtype. Not `module.to("meta")`: a
    bitsandbytes 4-bit weight (an nf4 base's text encoder) returns its own Parameter type from `.to()`, which
    torch refuses to rewrap for the meta device; replacing the tensors also drops their quantization state."""
    for part in module.modules():
        for name, param in list(part._parameters.items()):
            if param is not None:
                part._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=META), requires_grad=param.requires_grad)
        for name, buffer in list(part._buffers.items()):
            if buffer is not None:
                part._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=META)


def release_cached_encoders(base, device: torch.device, *, latents_cached: bool, text_cached: bool,
                            text_trained: bool, samples_wanted: bool) -> dict[str, str]:
    """Move what the cache made unnecessary off `device`; returns {part: where it went} for the log and tests."""
    moved: dict[str, str] = {}
    freed = 0
    if latents_cached:
        vae = base.vae
        # Swapped out rather than moved to meta: samples still move the VAE (decoder) between devices.
        for part in ("encoder", "quant_conv"):
            if isinstance(getattr(vae, part, None), torch.nn.Module):
                freed += _size(getattr(vae, part))
                setattr(vae, part, Released(f"vae.{part}"))
        moved["vae.encoder"] = "released"
        if not samples_wanted:  # the decoder only draws sample images
            freed += _release(vae, META)
            moved["vae"] = "meta"
    if text_cached and not text_trained:
        for name, encoder in base.text_encoders.items():
            if not samples_wanted:
                freed += _release(encoder, META)
                moved[name] = "meta"
            elif device.type != "cpu":
                freed += _release(encoder, torch.device("cpu"))
                moved[name] = "cpu"
    if moved:
        log.info("cached inputs: released %s (%.0f MB off %s)", ", ".join(f"{k} -> {v}" for k, v in moved.items()),
                 freed / 2**20, device)
    if device.type == "cuda":
        # torch's caching allocator would keep what the encoders and the caching pass held: hand it to the driver.
        torch.cuda.empty_cache()
    return moved


@contextlib.contextmanager
def borrowed(modules, device: torch.device):
    """Bring offloaded modules onto `device` for the duration of the block, then send them back."""
    homes = []
    for module in modules:
        parameter = next(module.parameters(), None)
        home = parameter.device if parameter is not None else device
        if home.type == "meta":
            raise RuntimeError(f"{type(module).__name__} was released after caching and cannot be used again")
        homes.append((module, home))
        if home != device:
            module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            if home != device:
                module.to(home)

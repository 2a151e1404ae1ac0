"""Load a base Stable Diffusion model from wherever a user has it, freeze it and put it in the compute dtype.

Sources: a built-in name (`sdlora:tiny`), a local diffusers folder, a single-file checkpoint (`.safetensors`), or a
hub id. Only LoRA weights ever train; everything loaded here is frozen.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora import backends

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class ModelLoadError(RuntimeError):
    """A base model that cannot be found or loaded; the message names the source and what to try."""


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion pipeline that LoRA training and generation use."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def family(self) -> str:
        """'sdxl', 'sd2' or 'sd1', read from the UNet config (SDXL conditions on time ids; SD2 on 1024-d text)."""
        config = self.unet.config
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
        if config.get("cross_attention_dim") == 1024:
            return "sd2"
        return "sd1"


# ---------------------------------------------------------------------------------------------------------------
# Built-in bases: built (or unpacked) once into a cache folder, then loaded like any local diffusers folder.


def _build_tiny(target: Path) -> None:
    from sdlora.tiny import save_tiny_pipeline

    save_tiny_pipeline(target)


BUILTIN_BASES: dict[str, Callable[[Path], None]] = {"sdlora:tiny": _build_tiny}


def cache_root() -> Path:
    return Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora"))


def resolve_builtin(name: str) -> Path:
    """Folder of a built-in base, building it atomically on first use (a crash leaves no half-built folder)."""
    if name not in BUILTIN_BASES:
        known = ", ".join(sorted(BUILTIN_BASES))
        raise ModelLoadError(f"model.base: unknown built-in {name!r}; known: {known}")
    target = cache_root() / "builtin" / name.split(":", 1)[1]
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        BUILTIN_BASES[name](staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------------------------


def _load_folder_or_hub(source: str, revision: str | None, variant: str | None, torch_dtype) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": revision} if revision else {}
    weights = dict(common, variant=variant) if variant else dict(common)
    return BaseModel(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch_dtype, **weights),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **weights),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **weights),
        scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        source=source,
    )


def _load_single_file(path: Path, config: str | None, torch_dtype, allow_pickle: bool = False) -> BaseModel:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from sdlora.safefiles import check_single_file

    try:
        check_single_file(path, allow_pickle)
    except ValueError as exc:
        raise ModelLoadError(f"model.base: {exc}") from None
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if config is not None:
        if config.startswith("sdlora:"):
            config = str(resolve_builtin(config))
        kwargs.update(config=config, local_files_only=Path(config).is_dir())
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model.base: cannot load single-file checkpoint {path}: {exc}. Offline, set model.single_file_config "
            "to a local diffusers folder of the same architecture."
        ) from exc
    return BaseModel(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=str(path),
    )


def load_base_model(
    base: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load the base from a built-in name, a folder, a single file or a hub id; frozen, in eval mode."""
    if base.startswith("sdlora:"):
        model = _load_folder_or_hub(str(resolve_builtin(base)), None, None, torch_dtype)
        model.source = base
    elif Path(base).is_file() or base.endswith(SINGLE_FILE_SUFFIXES):
        if not Path(base).is_file():
            raise ModelLoadError(f"model.base: checkpoint file {base} does not exist")
        model = _load_single_file(Path(base), single_file_config, torch_dtype, allow_pickle)
    elif Path(base).is_dir():
        if not (Path(base) / "model_index.json").is_file() and not (Path(base) / "unet").is_dir():
            raise ModelLoadError(f"model.base: {base} is a folder but not a diffusers pipeline (no model_index.json)")
        model = _load_folder_or_hub(base, revision, variant, torch_dtype)
    else:
        try:
            model = _load_folder_or_hub(base, revision, variant, torch_dtype)
        except Exception as exc:  # hub errors are many types; all mean the same to the user
            raise ModelLoadError(
                f"model.base: {base!r} is not a local folder or file, and loading it as a hub id failed: {exc}"
            ) from exc
    freeze(model)
    return model


def freeze(model: BaseModel) -> None:
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(False)
        module.eval()


def vae_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE decodes to black images in fp16 (activations overflow), so it runs in fp32 unless bf16 is asked."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def place(model: BaseModel, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Move frozen weights to the device in the compute dtype; the VAE in a dtype that cannot overflow."""
    for module, dtype in ((model.unet, weight_dtype), (model.text_encoder, weight_dtype),
                          (model.vae, vae_dtype_for(weight_dtype))):
        # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
        module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)


def set_attention_backend(unet, backend: str, device: torch.device) -> str:
    """SDPA is diffusers' default; xformers only where it is installed and the device is CUDA. Returns what's used."""
    if backend == "xformers":
        if device.type == "cuda" and backends.xformers_available():
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        log.warning("train.attention=xformers: xformers is not usable here (needs it installed and CUDA); using SDPA")
    return "sdpa"

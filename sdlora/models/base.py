"""Load a base Stable Diffusion model from wherever a user has it, freeze it and put it in the compute dtype.

Sources: a built-in name (`sdlora:tiny`), a local diffusers folder (SD1, SD2 or SDXL), a single-file checkpoint
(`.safetensors`, family read from its keys or given), or a hub id. Only LoRA weights ever train; everything loaded
here is frozen.
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

from sdlora.errors import UserError
from sdlora.models import backends, families, sd3

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class ModelLoadError(UserError, RuntimeError):
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
    # SDXL's and SD3's second text encoder (OpenCLIP-bigG, with projection) and its tokenizer; None for SD1/SD2.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    # SD3's T5-XXL and its tokenizer; None for the other families and for an SD3 base loaded without T5.
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    declared_family: str | None = None  # model.family, when the user names it

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def family(self) -> str:
        """'sd1', 'sd2', 'sd2-v', 'sdxl' or 'sd3': as declared in the config, else read from the components."""
        if self.declared_family:
            return self.declared_family
        if sd3.is_sd3_config(self.unet.config):
            return "sd3"
        return families.detect_family(self.unet.config, self.text_encoder.config, self.prediction_type)

    @property
    def text_encoders(self) -> dict[str, Any]:
        """Text encoders by adapter component name (`text_encoder`, `text_encoder_2` for SDXL and SD3, SD3's T5
        `text_encoder_3`)."""
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                    "text_encoder_3": self.text_encoder_3}
        return {name: module for name, module in encoders.items() if module is not None}

    @property
    def tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def denoiser_component(self) -> str:
        """The denoiser's prefix in an adapter file: `transformer` for SD3, `unet` for the others."""
        return sd3.COMPONENT if self.family == "sd3" else "unet"

    def pipeline(self, scheduler=None):
        """This base as a diffusers pipeline over the same modules; `scheduler` (default: the base's) samples."""
        if self.family == "sd3":
            return sd3.pipeline(self, scheduler)
        return pipeline_from_components(
            unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            scheduler=scheduler or self.scheduler, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
        )


def pipeline_from_components(*, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None,
                             tokenizer_2=None):
    """The one way sdlora assembles a diffusers pipeline, over already-built components (no copy of the weights):
    StableDiffusionXLPipeline when there is a second text encoder (SDXL), else StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        # The invisible watermark would make images differ from plain diffusers' depending on an optional package.
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------------------------
# Built-in bases: built (or unpacked) once into a cache folder, then loaded like any local diffusers folder.


def _build_tiny(target: Path) -> None:
    from sdlora.models.tiny import save_tiny_pipeline

    save_tiny_pipeline(target)


def _build_tiny_sdxl(target: Path) -> None:
    from sdlora.models.tiny import save_tiny_sdxl_pipeline

    save_tiny_sdxl_pipeline(target)


def _build_tiny_sd3(target: Path) -> None:
    from sdlora.models.tiny_sd3 import save_tiny_sd3_pipeline

    save_tiny_sd3_pipeline(target)


def _build_tiny_sd2v(target: Path) -> None:
    from sdlora.models.tiny import save_tiny_sd2v_pipeline

    save_tiny_sd2v_pipeline(target)


BUILTIN_BASES: dict[str, Callable[[Path], None]] = {"sdlora:tiny": _build_tiny}
BUILTIN_BASES.update({"sdlora:tiny-sdxl": _build_tiny_sdxl, "sdlora:tiny-sd2-v": _build_tiny_sd2v,
                      "sdlora:tiny-sd3": _build_tiny_sd3})
# Trained bases that ship inside the package (scripts/train_base.py makes them).
BUILTIN_VERSION = 2  # raise when what the builders make changes (2: every listed word is one token)
PACKAGED_BASES: dict[str, Path] = {"sdlora:shapes": Path(__file__).parents[1] / "assets" / "shapes"}


def cache_root() -> Path:
    return Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora"))


def resolve_builtin(name: str) -> Path:
    """Folder of a built-in base, building it atomically on first use (a crash leaves no half-built folder)."""
    if name in PACKAGED_BASES:
        folder = PACKAGED_BASES[name]
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"model.base: {name} is not in this install ({folder}); run scripts/train_base.py")
        return folder
    if name not in BUILTIN_BASES:
        known = ", ".join(sorted([*BUILTIN_BASES, *PACKAGED_BASES]))
        raise ModelLoadError(f"model.base: unknown built-in {name!r}; known: {known}")
    # The folder name carries the build's version: a cache built by an older sdlora (another tokenizer, other
    # shapes) is not silently reused after an upgrade.
    target = cache_root() / "builtin" / f"{name.split(':', 1)[1]}-v{BUILTIN_VERSION}"
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


def _load_folder_or_hub(source: str, revision: str | None, variant: str | None, torch_dtype,
                        frozen_dtype=None, use_t5: bool = True) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = {"revision": revision} if revision else {}
    weights = dict(common, variant=variant) if variant else dict(common)
    frozen_dtype = frozen_dtype or torch_dtype  # the UNet and text encoders; the VAE keeps torch_dtype
    if _has_component(source, "transformer", common):
        if not Path(source).is_dir() or sd3.is_sd3_folder(source):
            return sd3.load_folder(source, common, weights, torch_dtype, frozen_dtype, use_t5)
    parts: dict[str, Callable[[], Any]] = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=frozen_dtype, **weights
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **weights),
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=frozen_dtype, **weights
        ),
        "scheduler": lambda: DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
    }
    if _has_component(source, "text_encoder_2", common):
        parts["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        parts["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", dtype=frozen_dtype, **weights
        )
    # A full-size base takes tens of seconds to read from disk on a CPU: a bar over its parts on stderr, shown
    # only once loading has taken a few seconds (`delay`), so the tiny bases and the tests stay quiet.
    bar = tqdm(parts.items(), desc=f"loading base {Path(source).name}", unit="part", delay=3)
    return BaseModel(source=source, **{name: load() for name, load in bar})


def _has_component(source: str, name: str, common: dict) -> bool:
    """Whether a diffusers pipeline (folder or hub repo) has a component, e.g. SDXL's text_encoder_2."""
    if Path(source).is_dir():
        return (Path(source) / name / "config.json").is_file()
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source, **common)
    return bool(index.get(name)) and index[name][0] is not None


def single_file_family(path: Path) -> str | None:
    """Family of a `.safetensors` single-file checkpoint, read from its key names without loading tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return families.family_from_checkpoint_keys(handle.keys())


def _load_single_file(
    path: Path, config: str | None, torch_dtype, family: str | None = None, allow_pickle: bool = False,
    use_t5: bool = True,
) -> BaseModel:
    import diffusers

    from sdlora.files.untrusted import check_single_file

    try:
        check_single_file(path, allow_pickle)
    except ValueError as exc:
        raise ModelLoadError(f"model.base: {exc}") from None
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if config is not None:
        if config.startswith("sdlora:"):
            config = str(resolve_builtin(config))
        kwargs.update(config=config, local_files_only=Path(config).is_dir())
    # Pickle checkpoints are not opened again just to read key names: their family must be given.
    family = family or (single_file_family(path) if path.suffix == ".safetensors" else None)
    if family is None:
        raise ModelLoadError(
            f"model.base: cannot tell which Stable Diffusion family {path} is from its keys; set model.family "
            f"to one of {', '.join(families.FAMILIES)}"
        )
    pipeline_class = getattr(diffusers, families.TABLE[family].pipeline_class)
    if family == "sd3":
        kwargs.update(sd3.text_encoders_for_single_file(path, config, torch_dtype, use_t5))
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model.base: cannot load single-file checkpoint {path}: {exc}. Offline, set model.single_file_config "
            "to a local diffusers folder of the same architecture."
        ) from exc
    if family == "sd3":
        return sd3.base_from_pipeline(pipe, str(path))
    return BaseModel(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=diffusers.DDPMScheduler.from_config(pipe.scheduler.config),
        source=str(path),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


def load_base_model(
    base: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    family: str | None = None,
    allow_pickle: bool = False,
    frozen_dtype: torch.dtype | None = None,
    use_t5: bool = True,
) -> BaseModel:
    """Load the base from a built-in name, a folder, a single file or a hub id; frozen, in eval mode.
    `family` (model.family) overrides detection: it picks the single-file pipeline class, and 'sd2-v' makes
    the scheduler predict v. `frozen_dtype` (folders and hub ids) loads the UNet and text encoders in another
    dtype than the VAE: bf16 when their weights will be stored in bf16 or fp8 anyway. `use_t5` false loads an SD3
    base without its T5 encoder (model.t5)."""
    if base.startswith("sdlora:"):
        model = _load_folder_or_hub(str(resolve_builtin(base)), None, None, torch_dtype, frozen_dtype, use_t5)
        model.source = base
    elif Path(base).is_file() or base.endswith(SINGLE_FILE_SUFFIXES):
        if not Path(base).is_file():
            raise ModelLoadError(f"model.base: checkpoint file {base} does not exist")
        model = _load_single_file(Path(base), single_file_config, torch_dtype, family, allow_pickle, use_t5)
    elif Path(base).is_dir():
        if not (Path(base) / "model_index.json").is_file() and not (Path(base) / "unet").is_dir() \
                and not (Path(base) / "transformer").is_dir():
            raise ModelLoadError(f"model.base: {base} is a folder but not a diffusers pipeline (no model_index.json)")
        model = _load_folder_or_hub(base, revision, variant, torch_dtype, frozen_dtype, use_t5)
    else:
        try:
            model = _load_folder_or_hub(base, revision, variant, torch_dtype, frozen_dtype, use_t5)
        except Exception as exc:  # hub errors are many types; all mean the same to the user
            raise ModelLoadError(
                f"model.base: {base!r} is not a local folder or file, and loading it as a hub id failed: {exc}"
            ) from exc
    if family is not None:
        _declare_family(model, family)
    freeze(model)
    return model


def _declare_family(model: BaseModel, family: str) -> None:
    found = model.family
    if (family == "sd3") != (found == "sd3"):
        what = "an SD3 base" if found == "sd3" else "not an SD3 base (it has a UNet)"
        raise ModelLoadError(f"model.family: {family!r}, but {model.source} is {what}; set model.family={found!r} "
                             "or leave it unset")
    if family == "sd3":
        model.declared_family = family
        return
    if family == "sdxl" and model.text_encoder_2 is None:
        raise ModelLoadError(f"model.family: 'sdxl', but {model.source} has no text_encoder_2 (not an SDXL base)")
    if family != "sdxl" and model.text_encoder_2 is not None:
        raise ModelLoadError(f"model.family: {family!r}, but {model.source} has two text encoders (an SDXL base)")
    target = families.TABLE[family].prediction_type
    if target == "v_prediction" and model.prediction_type != target:
        # SD2 single files do not say whether they predict v; the user said so.
        model.scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type=target)
    model.declared_family = family


def freeze(model: BaseModel) -> None:
    for module in (model.unet, model.vae, *model.text_encoders.values()):
        module.requires_grad_(False)
        module.eval()


def vae_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE decodes to black images in fp16 (activations overflow), so it runs in fp32 unless bf16 is asked."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def place(model: BaseModel, device: torch.device, weight_dtype: torch.dtype) -> None:
    """Move frozen weights to the device in the compute dtype; the VAE in a dtype that cannot overflow."""
    import logging as std_logging

    # diffusers warns on every .to(dtype) of a model ("modules that should be kept in float32: []"), even when
    # the list is empty, as it is for these models: an alarm with nothing behind it, so it is muted here.
    modeling_log = std_logging.getLogger("diffusers.models.modeling_utils")
    level = modeling_log.level
    modeling_log.setLevel(std_logging.ERROR)
    try:
        text_encoders = [(module, weight_dtype) for module in model.text_encoders.values()]
        for module, dtype in ((model.unet, weight_dtype), *text_encoders, (model.vae, vae_dtype_for(weight_dtype))):
            module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
    finally:
        modeling_log.setLevel(level)


def set_attention_backend(unet, backend: str, device: torch.device) -> str:
    """SDPA is diffusers' default; xformers only where it is installed and the device is CUDA. Returns what's used."""
    if backend == "xformers":
        if device.type == "cuda" and backends.xformers_available():
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        log.warning("train.attention=xformers: xformers is not usable here (needs it installed and CUDA); using SDPA")
    return "sdpa"


"""Generate images from a base model with several LoRA adapters stacked at chosen weights.

Adapters are read by `formats` (any supported file layout) and injected through peft, each as its own named
adapter, so weights can change between images without reloading, and the stack can be fused into the base weights
for full-speed generation and unfused again.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdlora import formats, rng
from sdlora.errors import UserError
from sdlora.formats.lycoris import LycorisFile
from sdlora.inference.weight_patches import WeightPatches
from sdlora.models import BaseModel, lora

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",  # SD3's own, and the only one a rectified-flow base samples with
}
FLOW_SCHEDULERS = ("flow_euler",)


class GenerationSettingError(UserError, ValueError):
    """A generation or grid setting that cannot be used (an --lora spec, a scheduler name, a grid axis or its
    values); the message names the option."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to stack: a file, its UNet weight and its text-encoder weight (default: the same)."""

    source: str
    unet_weight: float = 1.0
    text_encoder_weight: float | None = None

    @property
    def te_weight(self) -> float:
        return self.unet_weight if self.text_encoder_weight is None else self.text_encoder_weight

    @property
    def name(self) -> str:
        """What grids and merges call the adapter: its file's stem (`runs/dots/my_dots.safetensors` -> `my_dots`); a
        hub reference by its file or repo name (`alice/dots:v2.safetensors` -> `v2`, `alice/dots` -> `dots`)."""
        return re.split(r"[\\/:]", self.source.rstrip("/\\"))[-1].removesuffix(".safetensors") or self.source

    @classmethod
    def parse(cls, text: str, option: str = "--lora") -> AdapterSpec:
        """`path`, `path:w` or `path:w_unet:w_te` (Windows drive letters and hub ids keep their colons). `option`
        (`--lora`, `sample.adapters`) names where the text came from in errors."""
        parts = text.rsplit(":", 2)
        numbers: list[float] = []
        while len(parts) > 1 and _is_number(parts[-1]) and len(numbers) < 2:
            numbers.insert(0, float(parts.pop()))
        source = ":".join(parts)
        if not all(math.isfinite(n) for n in numbers):
            raise GenerationSettingError(f"{option} {text!r}: weights must be finite numbers, e.g. "
                                         f"{source or 'style.safetensors'}:0.8")
        if not source:
            raise GenerationSettingError(f"{option} {text!r}: expected PATH[:WEIGHT[:TEXT_ENCODER_WEIGHT]], "
                                         "e.g. style.safetensors:0.8")
        if not numbers:
            return cls(source)
        return cls(source, numbers[0], numbers[1] if len(numbers) == 2 else None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def generation_device() -> tuple[torch.device, torch.dtype]:
    """Where `sdlora generate` and `grid` run: a CUDA GPU when there is one, in bf16 where it has bf16 units (fp16
    would overflow SD's VAE to black images) and fp32 otherwise; else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.device("cpu"), torch.float32


def build_pipeline(base: BaseModel, scheduler: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, progress: bool = False):
    """A diffusers StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL bases) over already-loaded
    components (no second copy of the weights). It leaves the process's memory policy alone: commands that
    generate on a CPU call `hostmem.settle_host_memory` themselves. `progress` shows diffusers' bar over the
    denoising steps on stderr (`sdlora generate`); off, it stays quiet (previews under the training bar, grids
    with their own bar over cells). `scheduler` None: ddim, or flow_euler for an SD3 base."""
    import diffusers

    flow_base = base.family == "sd3"
    scheduler = scheduler or ("flow_euler" if flow_base else "ddim")
    if scheduler not in SCHEDULERS:
        raise GenerationSettingError(f"--scheduler: unknown {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if flow_base != (scheduler in FLOW_SCHEDULERS):
        allowed = FLOW_SCHEDULERS if flow_base else [name for name in SCHEDULERS if name not in FLOW_SCHEDULERS]
        raise GenerationSettingError(f"--scheduler: {scheduler} cannot sample this {base.family} base; choose "
                                     f"{' or '.join(allowed)}")
    pipe = base.pipeline(getattr(diffusers, SCHEDULERS[scheduler]).from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=not progress, desc="denoising", unit="step")
    _decode_in_vae_dtype(base.vae)
    # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
    return pipe.to(device) if base.unet.dtype == dtype else pipe.to(device, dtype)


def _cast_input_to_own_dtype(module: torch.nn.Module, args: tuple):
    weight = next(module.parameters(), None)
    if weight is None or not args or not torch.is_tensor(args[0]) or args[0].dtype == weight.dtype:
        return None
    return (args[0].to(weight.dtype), *args[1:])


def _decode_in_vae_dtype(vae: torch.nn.Module) -> None:
    """Let a VAE kept in fp32 decode latents denoised in fp16 or bf16. Training in fp16 keeps the VAE in fp32
    (`models.vae_dtype_for`: fp16 VAEs overflow to black images) and samples reuse those parts, but diffusers' SD and
    SDXL pipelines hand the VAE latents in the UNet's dtype (SDXL casts only an fp16 VAE it upcasts itself)."""
    for part in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)):
        if isinstance(part, torch.nn.Module) and not getattr(part, "_sdlora_casts_input", False):
            part.register_forward_pre_hook(_cast_input_to_own_dtype)
            part._sdlora_casts_input = True


DENOISERS = ("unet", "transformer")  # the adapter components that are the denoiser (SD1/2/XL; SD3)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's UNet, or its transformer (SD3)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _denoiser_name(pipe) -> str:
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


class AdapterStack:
    """Named adapters on one pipeline; `set_weights` chooses which are active and how strongly."""

    COMPONENT_ATTRS = {"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
                       "text_encoder_2": "text_encoder_2"}

    def __init__(self, pipe):
        self.pipe = pipe
        self.names: list[str] = []
        self._fused: _Fused | None = None
        self.patches: WeightPatches | None = None  # LyCORIS-type adapters (LoHa, LoKr, DoRA, ...): weight_patches.py

    def _module(self, component: str) -> torch.nn.Module:
        module = getattr(self.pipe, self.COMPONENT_ATTRS.get(component, ""), None)
        if module is None:
            raise formats.AdapterFormatError(f"this pipeline has no {component} for the adapter to patch")
        return module

    def _present(self) -> list[tuple[str, torch.nn.Module]]:
        """Components this pipeline has: SD1/SD2 pipelines have no text_encoder_2."""
        found = [(c, getattr(self.pipe, attr, None)) for c, attr in self.COMPONENT_ATTRS.items()]
        return [(c, module) for c, module in found if module is not None]

    def add(self, name: str, adapter: formats.AdapterFile, source: str | Path | None = None) -> None:
        """Attach `adapter` as `name`, once its family and every layer's shape are checked against this pipeline's
        base (nothing is attached if one does not fit); `source` names the file in that error."""
        from sdlora.formats.validate import base_family, check_fits

        self._refuse_if_fused("add an adapter")
        if name in self.names:
            raise ValueError(f"adapter name {name!r} is already loaded")
        models = dict(self._present())
        check_fits(source or name, adapter, models, base_family(models))
        if isinstance(adapter, LycorisFile):
            self.patches = self.patches or WeightPatches(models)
            self.patches.add(name, adapter, source or name)
            self.names.append(name)
            return
        device, dtype = denoiser(self.pipe).device, denoiser(self.pipe).dtype
        for component in adapter.components:
            module = self._module(component)
            tensors = lora.fit_text_model_prefix(
                module, {k: v.to(device, dtype) for k, v in adapter.tensors[component].items()})
            # peft matches target names as path suffixes, so the shape fits either spelling of the paths.
            lora.load_adapter(module, tensors, adapter.shapes[component], name)
        self.names.append(name)

    def set_weights(self, weights: dict[str, tuple[float, float]]) -> None:
        """`{name: (unet_weight, text_encoder_weight)}`; adapters not named are switched off."""
        self._refuse_if_fused("change adapter weights")
        unknown = set(weights) - set(self.names)
        if unknown:
            raise KeyError(f"unknown adapter(s) {sorted(unknown)}; loaded: {self.names}")
        for component, module in self._present():
            index = 0 if component in DENOISERS else 1  # the text-encoder weight applies to both SDXL encoders
            lora.set_weights(module, {name: w[index] for name, w in weights.items()})
        if self.patches is not None:
            self.patches.set_weights(weights)

    def fuse(self, reversible: bool = True) -> None:
        """Merge the active adapters at their weights into the base weights, then take peft's wrappers out of the
        model: fused, it runs exactly the base model's modules, so it generates at the base's speed.

        `reversible` keeps the original weights (a CPU copy) and the wrappers, so `unfuse` restores both bit for bit
        (subtracting the update back would leave rounding residue). One-shot generation passes False and keeps
        neither: no copy of the attention weights, and the adapters' tensors are freed."""
        self._refuse_if_fused("fuse")
        originals: dict[tuple[str, str], torch.Tensor] = {}
        unwrapped: lora.Unwrapped = []
        for component, module in self._present():
            if reversible:
                for layer_name, layer in module.named_modules():
                    if isinstance(layer, lora.BaseTunerLayer):
                        originals[(component, layer_name)] = layer.get_base_layer().weight.detach().to("cpu", copy=True)
            lora.fuse(module)
            unwrapped += lora.unwrap(module)
            if not reversible and isinstance(getattr(module, "peft_config", None), dict):
                for name in self.names:
                    module.peft_config.pop(name, None)
        self._fused = _Fused(originals, unwrapped) if reversible else _Fused({}, [], reversible=False)

    def unfuse(self) -> None:
        if self._fused is None:
            return
        if not self._fused.reversible:
            raise RuntimeError("these adapters were fused with reversible=False: load the pipeline again to change "
                               "or remove them")
        fused, self._fused = self._fused, None
        lora.rewrap(fused.unwrapped)
        for _, module in self._present():
            lora.unfuse(module)
        with torch.no_grad():
            for (component, layer_name), weight in fused.originals.items():
                base = getattr(self.pipe, component).get_submodule(layer_name).get_base_layer()
                base.weight.copy_(weight)

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def _refuse_if_fused(self, action: str) -> None:
        if self._fused is not None:
            raise RuntimeError(f"cannot {action}: the adapters are fused into the base weights; call unfuse() first")


@dataclass
class _Fused:
    """What `AdapterStack.unfuse` puts back: original base weights by (component, module path), and the wrappers."""

    originals: dict[tuple[str, str], torch.Tensor]
    unwrapped: lora.Unwrapped
    reversible: bool = True


@contextlib.contextmanager
def preview_adapters(pipe, specs: list[AdapterSpec], trained: str = "default"):
    """Stack other adapters beside the one being trained, for samples only. Afterwards they are gone and the trained
    adapter is again the only active one, at weight 1 and trainable; loading them draws no training randomness."""
    if not specs:
        yield
        return
    stack = AdapterStack(pipe)
    names = [f"preview_{number}" for number in range(len(specs))]
    try:
        with rng.isolated():
            for name, spec in zip(names, specs):
                _add_file(stack, name, spec.source, "sample.adapters")
        for component, index in ((_denoiser_name(pipe), 0), ("text_encoder", 1)):
            module = getattr(pipe, component)
            own = {trained: 1.0} if trained in lora.adapter_names(module) else {}
            weights = {name: (spec.unet_weight, spec.te_weight)[index] for name, spec in zip(names, specs)}
            lora.set_weights(module, {**own, **weights})
        if stack.patches is not None:
            stack.patches.set_weights({name: (spec.unet_weight, spec.te_weight) for name, spec in zip(names, specs)})
        yield stack
    finally:
        if stack.patches is not None:
            stack.patches.restore()  # the trained model's weights exactly as they were
        for component in (_denoiser_name(pipe), "text_encoder"):
            module = getattr(pipe, component)
            for name in names:
                lora.delete_adapter(module, name)
            if trained in lora.adapter_names(module):
                lora.set_weights(module, {trained: 1.0})
                lora.set_trainable(module, trained)


def _add_file(stack: AdapterStack, name: str, path, option: str = "--lora",
              adapter: formats.AdapterFile | None = None) -> None:
    """Read an adapter file (unless already read) into the stack; an adapter that does not fit the base names the
    option as well as the file."""
    adapter = adapter or formats.read_adapter(path)
    try:
        stack.add(name, adapter, source=path)
    except lora.AdapterMismatchError as exc:
        message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        raise lora.AdapterMismatchError(f"{option} {message}") from None


@dataclass(frozen=True)
class ReadAdapter:
    """A spec whose file is found (`path`) and read: every check that needs no base is behind it."""

    spec: AdapterSpec
    path: str
    adapter: formats.AdapterFile


def read_adapters(specs: list[AdapterSpec], resolve=None) -> list[ReadAdapter]:
    """Each spec's file (resolved to a local path by `resolve`, e.g. a hub download), read and checked. Commands
    call it before loading the base, so a damaged file is reported in a second, not after the model loads."""
    out = []
    for spec in specs:
        path = str(resolve(spec.source) if resolve else spec.source)
        out.append(ReadAdapter(spec, path, formats.read_adapter(path)))
    return out


def stack_adapters(pipe, specs: list[AdapterSpec] | list[ReadAdapter], resolve=None) -> AdapterStack:
    """Load each spec's file (or take the already read adapters) and set its weights."""
    stack = AdapterStack(pipe)
    weights = {}
    read = [s if isinstance(s, ReadAdapter) else None for s in specs]
    for number, (spec, done) in enumerate(zip(specs, read)):
        spec = done.spec if done else spec
        path = done.path if done else (resolve(spec.source) if resolve else spec.source)
        name = f"{number}_{Path(str(path)).stem}"
        _add_file(stack, name, path, adapter=done.adapter if done else None)
        weights[name] = (spec.unet_weight, spec.te_weight)
    stack.set_weights(weights)
    return stack


def generate(pipe, prompt: str, *, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5,
             negative_prompt: str = "", height: int | None = None, width: int | None = None,
             num_images: int = 1) -> list[Image.Image]:
    """Images for one prompt; image i uses seed + i, so a batch equals separate single-image calls."""
    images = []
    with rng.isolated(), torch.no_grad():
        for index in range(num_images):
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            out = pipe(
                prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=generator, height=height, width=width, output_type="pil",
            )
            images.extend(out.images)
    return images

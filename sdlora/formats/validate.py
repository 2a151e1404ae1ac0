"""The checks every adapter passes when it is read, and before it touches a base.

Reading (`read_adapter`, so `info`, `convert`, `merge`, `generate`, `grid`, `<lora:…>` tags and a run's
`sample.adapters` alike): every tensor is finite, and each module's A and B agree on the rank. A NaN or inf in a
LoRA turns every image it touches black (or bakes NaN into a base for good), and a half-written or diverged file is
the usual cause; nothing downstream can repair it, so it is refused by name.

Before a base is touched (`check_fits`, called by the adapter stack and by `merge --into-base`): the family the
file says it was made for (`sdlora.family`, kohya's `ss_base_model_version`, modelspec's `architecture`, else its
key layout) is the base's, and every layer's A and B have the shapes of the base's module. Without this, peft
fails halfway through loading with a "size mismatch" traceback, or a merge dies inside diffusers' block classes.
SD2 and SD2-v share one architecture, so they count as one family here (the prediction type is the run's business).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from sdlora.formats.adapter import AdapterFile, AdapterFormatError
from sdlora.models import families
from sdlora.models.lora import AdapterMismatchError, BaseTunerLayer

SHOWN = 3  # layers named in a message before "and N more"

_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3"}
# Cross-attention width of the real families (the input of every `attn2.to_k`), and their text encoders' widths.
_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_read(path: str | Path, adapter: AdapterFile) -> None:
    """What every read adapter must satisfy on its own: finite tensors and alphas, A and B paired and of one rank."""
    bad = []
    for component in adapter.components:
        for key, tensor in adapter.tensors[component].items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{component}.{key.removesuffix('.weight')}")
    if bad:
        raise AdapterFormatError(
            f"{path}: {len(bad)} tensor(s) hold NaN or infinite values ({_listed(sorted(bad))}): the file is damaged "
            "or was saved from a diverged run; nothing was loaded, use an earlier checkpoint or retrain")
    for component, shape in adapter.shapes.items():
        alphas = [shape.alpha, *shape.alpha_pattern.values()]
        if not all(math.isfinite(float(a)) for a in alphas):
            raise AdapterFormatError(f"{path}: {component}: alpha is not a finite number ({shape.alpha}); the header "
                                     "or the .alpha tensors are damaged")
    for component in adapter.components:
        tensors = adapter.tensors[component]
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            b = tensors.get(f"{module}.lora_B.weight")
            layer = f"{component}.{module}"
            if b is None:
                raise AdapterFormatError(f"{path}: layer {layer} has lora_A but no lora_B; the file is incomplete")
            if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
                raise AdapterFormatError(
                    f"{path}: layer {layer}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not agree on the "
                    "rank (A is [rank, in], B is [out, rank]); the file is damaged")
        orphans = [k for k in tensors if k.endswith(".lora_B.weight")
                   and k.removesuffix(".lora_B.weight") + ".lora_A.weight" not in tensors]
        if orphans:
            raise AdapterFormatError(f"{path}: {component}.{orphans[0]} has no lora_A; the file is incomplete")


# ---------------------------------------------------------------------------------------------------------------
# Families


def family_group(family: str) -> str:
    """sd2 and sd2-v are one architecture: an adapter fits both."""
    return "sd2" if family.startswith("sd2") else family


def declared_family(metadata: dict[str, str]) -> tuple[str, str] | None:
    """(family, the header field that says so) from the file's own metadata; None when it says nothing sdlora knows."""
    family = metadata.get("sdlora.family", "")
    if family in families.TABLE:
        return family_group(family), f"sdlora.family={family}"
    version = metadata.get("ss_base_model_version", "")
    for prefix, name in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if version.startswith(prefix):
            return name, f"ss_base_model_version={version}"
    architecture = metadata.get("modelspec.architecture", "")
    for marker, name in (("-xl-", "sdxl"), ("-v2", "sd2"), ("-v1", "sd1")):
        if marker in architecture:
            return name, f"modelspec.architecture={architecture}"
    return None


def layout_family(adapter: AdapterFile) -> tuple[str, str] | None:
    """(family or 'sd1/sd2', why) from the keys and widths alone, for files without a family in their header.

    SDXL's UNet has no attention at its highest resolution (`down_blocks.0`) and attention in its first up block,
    several transformer blocks per attention, and a second text encoder; SD1/SD2 the opposite. Real models also
    give themselves away by the cross-attention width (768, 1024, 2048)."""
    unet = adapter.tensors.get("unet", {})
    for key, a in unet.items():
        if ".attn2.to_k.lora_A" in key and a.ndim == 2 and int(a.shape[1]) in _CROSS_WIDTH:
            return _CROSS_WIDTH[int(a.shape[1])], f"its cross-attention width {int(a.shape[1])}"
    if "text_encoder_2" in adapter.components:
        return "sdxl", "its text_encoder_2 layers"
    if any(re.search(r"(^|\.)up_blocks\.0\.attentions\.|\.transformer_blocks\.[1-9]", key) for key in unet):
        return "sdxl", "its SDXL UNet key layout"
    if any(re.search(r"(^|\.)down_blocks\.0\.attentions\.", key) for key in unet):
        return "sd1/sd2", "its SD1/SD2 UNet key layout"
    return None


def adapter_family(adapter: AdapterFile) -> tuple[str, str] | None:
    """What the adapter was made for: its header first, else its key layout."""
    return declared_family(adapter.metadata) or layout_family(adapter)


def base_family(models: dict[str, torch.nn.Module]) -> str:
    """The family group of loaded components (`unet` or SD3's `transformer`, `text_encoder`, `text_encoder_2`)."""
    from sdlora.models import sd3

    transformer = models.get("transformer")
    if transformer is not None and sd3.is_sd3_config(transformer.config):  # before SDXL: SD3 has two CLIPs too
        return "sd3"
    if models.get("text_encoder_2") is not None:
        return "sdxl"
    text_config = getattr(models.get("text_encoder"), "config", None)
    return family_group(families.detect_family(models["unet"].config, text_config, "epsilon"))


def _fits_family(made_for: str, base: str) -> bool:
    return made_for == base or (made_for == "sd1/sd2" and base in ("sd1", "sd2"))


# ---------------------------------------------------------------------------------------------------------------
# Fitting a base


def base_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module paths of `model`, with peft's wrappers (an adapter already attached) seen through to the base layer."""
    found = {}
    for name, module in model.named_modules():
        if ".base_layer" in f".{name}" or ".lora_" in f".{name}":
            continue
        found[name] = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return found


def find_layer(modules: dict[str, torch.nn.Module], path: str) -> torch.nn.Module | None:
    """As peft matches a target: the exact path, else the one module whose path ends with it (transformers 4 CLIP
    paths carry `text_model.`, which adapter files written under transformers 5 lack)."""
    if path in modules:
        return modules[path]
    found = [m for name, m in modules.items() if name.endswith(f".{path}")]
    return found[0] if len(found) == 1 else None


def _expected(module: torch.nn.Module, rank: int) -> tuple[list[int], list[int]] | None:
    if isinstance(module, torch.nn.Linear):
        return [rank, module.in_features], [module.out_features, rank]
    if isinstance(module, torch.nn.Conv2d):
        return [rank, module.in_channels, *module.kernel_size], [module.out_channels, rank, 1, 1]
    return None


def check_fits(path: str | Path, adapter: AdapterFile, models: dict[str, torch.nn.Module], family: str) -> None:
    """Refuse, before anything is attached, an adapter made for another family or whose layers' shapes are not the
    base's modules'. `models`: the base's components by adapter component name; `family`: the base's family."""
    base = family_group(family)
    made_for = adapter_family(adapter)
    if made_for is not None and not _fits_family(made_for[0], base):
        name = _NAMES.get(made_for[0], made_for[0].replace("sd1/sd2", "SD1.x/SD2.x"))
        raise AdapterMismatchError(
            f"{path}: made for {name} ({made_for[1]}) but the base is {_NAMES.get(base, base)}: use a {name} base "
            f"(--base), or an adapter made for {_NAMES.get(base, base)}")
    for component in adapter.components:
        model = models.get(component)
        if model is None:
            raise AdapterMismatchError(f"{path}: has {component} layers but the {_NAMES.get(base, base)} base has no "
                                       f"{component}: it was made for another base")
        modules = base_layers(model)
        missing, wrong = [], []
        tensors = adapter.tensors[component]
        for key, a in sorted(tensors.items()):
            if not key.endswith(".lora_A.weight"):
                continue
            module_path = key.removesuffix(".lora_A.weight")
            b = tensors[f"{module_path}.lora_B.weight"]
            module = find_layer(modules, module_path)
            if module is None:
                missing.append(f"{component}.{module_path}")
                continue
            expected = _expected(module, int(a.shape[0]))
            if expected is not None and (list(a.shape) != expected[0] or list(b.shape) != expected[1]):
                wrong.append((f"{component}.{module_path}", a, b, module, expected))
        if wrong:
            layer, a, b, module, (want_a, want_b) = wrong[0]
            more = f" ({len(wrong) - 1} more layer(s) differ too)" if len(wrong) > 1 else ""
            raise AdapterMismatchError(
                f"{path}: layer {layer} does not fit the base: the adapter has lora_A {list(a.shape)}, lora_B "
                f"{list(b.shape)}, the base's {type(module).__name__} needs lora_A {want_a}, lora_B {want_b}{more}; "
                "it was made for another base: use the one it was trained on (`sdlora info FILE` names it)")
        if missing:
            raise AdapterMismatchError(
                f"{path}: does not fit the base: {len(missing)} layer(s) are not in it ({_listed(missing)}); it was "
                "made for another base: use the one it was trained on (`sdlora info FILE` names it)")

"""Merge adapters into one, exactly or re-ranked by SVD, and bake an adapter into a base model. Tensors only.

Each adapter contributes `w * (alpha / r) * B @ A` per module. Concatenating the A's along the rank and the
scaled B's alongside gives one adapter of rank sum(r) with one uniform alpha whose update is exactly the
weighted sum. `rank=k` then replaces each module's product by its best rank-k approximation (truncated SVD),
computed through QR factors so the full out x in matrix is never decomposed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.formats import COMPONENTS, AdapterFile, AdapterFormatError, lowrank, lycoris, read_adapter
from sdlora.formats.lycoris import LycorisFile
from sdlora.formats.validate import adapter_family, check_fits
from sdlora.inference.pipeline import AdapterSpec, ReadAdapter
from sdlora.models import lora
from sdlora.models.lora import AdapterMismatchError


def _modules(adapter: AdapterFile, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, alpha / r) for one component."""
    shape, tensors = adapter.shapes[component], adapter.tensors[component]
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        rank = int(a.shape[0])
        alpha = float(shape.alpha_pattern.get(module, shape.alpha))
        out[module] = (a.float(), tensors[f"{module}.lora_B.weight"].float(), alpha / rank)
    return out


def merge_files(specs: list[AdapterSpec] | list[ReadAdapter], rank: int | None = None, base=None) -> AdapterFile:
    """`merge_adapters` over adapter files (or already read ones) at their specs' UNet weights, each recorded by
    its file's name. With `base` (a loaded BaseModel, for `--into-base`) each file is first checked to fit it."""
    read = [s if isinstance(s, ReadAdapter) else ReadAdapter(s, s.source, read_adapter(s.source)) for s in specs]
    if base is not None:
        models = {base.denoiser_component: base.unet, **base.text_encoders}
        for item in read:
            check_fits(item.path, item.adapter, models, base.family)
    return merge_adapters([(item.adapter, item.spec.unet_weight) for item in read], rank,
                          names=[item.spec.name for item in read], sources=[item.path for item in read])


def _same_family(items: list[tuple[AdapterFile, float]], sources: list[str]) -> None:
    known = [(source, found) for (adapter, _), source in zip(items, sources) if (found := adapter_family(adapter))]
    for source, (family, why) in known[1:]:
        first, (first_family, first_why) = known[0]
        if not (family == first_family or "sd1/sd2" in (family, first_family)
                and {family, first_family} - {"sd1/sd2"} <= {"sd1", "sd2"}):
            raise AdapterMismatchError(f"merge: {first} was made for {first_family} ({first_why}) but {source} for "
                                       f"{family} ({why}); merge adapters made for the same base")


def _same_shapes(component: str, module: str, pieces: list[tuple[torch.Tensor, torch.Tensor, str]]) -> None:
    """Adapters for one base agree on each layer's in and out sizes; ranks may differ (they are concatenated)."""
    a0, b0, first = pieces[0]
    for a, b, source in pieces[1:]:
        if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
            raise AdapterMismatchError(
                f"merge: layer {component}.{module} differs: {first} has lora_A {list(a0.shape)}, lora_B "
                f"{list(b0.shape)} but {source} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; they were made "
                "for different bases")


def merge_adapters(items: list[tuple[AdapterFile, float]], rank: int | None = None,
                   names: list[str] | None = None, sources: list[str] | None = None) -> AdapterFile:
    """One adapter equal to the weighted stack of `items`; exact, or re-ranked to `rank` by truncated SVD.

    `sdlora.merged_from` records each source as NAME:WEIGHT: `names` (e.g. the files' stems), else the title in
    the source's own header, else its place in the list. `sources` name the items in errors (default: numbers)."""
    if not items:
        raise AdapterFormatError("merge: give at least one adapter")
    sources = sources or [f"adapter {n}" for n in range(len(items))]
    for (adapter, _), source in zip(items, sources):
        if isinstance(adapter, LycorisFile):  # its layers are not lora_A/lora_B pairs: merging would drop them
            raise AdapterFormatError(f"merge: {source} is a {lycoris.adapter_type(adapter)} adapter, which merges "
                                     "only into a base (--into-base); make it a plain LoRA first to merge it with "
                                     "others into one adapter")
    _same_family(items, sources)
    components = [c for c in COMPONENTS if any(c in a.components for a, _ in items)]
    tensors, shapes = {}, {}
    for component in components:
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}
        for (adapter, weight), source in zip(items, sources):
            if component not in adapter.components:
                continue
            for module, (a, b, scale) in _modules(adapter, component).items():
                parts.setdefault(module, []).append((a, b * (weight * scale), source))
        state, ranks = {}, {}
        for module, pieces in parts.items():
            _same_shapes(component, module, pieces)
            a = torch.cat([p[0] for p in pieces], dim=0)
            b = torch.cat([p[1] for p in pieces], dim=1)
            if rank is not None and rank < a.shape[0]:
                where = f"merge --rank {rank}: layer {component}.{module}"
                factors = lowrank.factorize_product(a, b, rank=rank, what=where)
                a, b = factors.down, factors.up
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterFormatError(f"merge: layer {component}.{module} is not finite after merging at these weights "
                                         f"({', '.join(f'{w:g}' for _, w in items)}); use smaller weights")
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a.contiguous(), b.contiguous()
            ranks[module] = int(a.shape[0])
        shapes[component] = lowrank.uniform_alpha(state, ranks)
        tensors[component] = state
    first = items[0][0].metadata
    metadata = {k: v for k, v in first.items() if k in ("sdlora.family", "sdlora.base_model", "sdlora.prediction_type")}
    names = names or [a.metadata.get("modelspec.title") or f"adapter {n}" for n, (a, _) in enumerate(items)]
    metadata["sdlora.merged_from"] = ", ".join(f"{name}:{w:g}" for name, (_, w) in zip(names, items))
    return AdapterFile(tensors=tensors, shapes=shapes, metadata=metadata)


def delta(adapter: AdapterFile, component: str, module: str) -> torch.Tensor:
    """The full weight update (alpha / r) * B @ A of one module, shaped like the module's weight."""
    a, b, scale = _modules(adapter, component)[module]
    product = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return (product * scale).reshape(b.shape[0], *a.shape[1:])


def bake_into(models: dict[str, torch.nn.Module], adapter: AdapterFile, weight: float = 1.0) -> int:
    """Add `weight` times the adapter's update into the base weights in place (no peft layers left behind).

    `models` maps component names to modules; returns how many weights changed."""
    from sdlora.formats.validate import base_family

    check_fits("--into-base", adapter, models, base_family(models))  # never half-baked: all layers fit, or none
    changed = 0
    with torch.no_grad():
        for component in adapter.components:
            if component not in models:
                raise AdapterFormatError(f"--into-base: the base has no {component} for this adapter")
            model = models[component]
            # SD3's first text encoder keeps `text_model.` in its paths, which files read without (see lora.py)
            paths = lora.fit_text_model_prefix(model, {module: None for module in _modules(adapter, component)})
            for module, path in zip(_modules(adapter, component), paths):
                target = model.get_submodule(path).weight
                update = delta(adapter, component, module).reshape(target.shape)
                target.add_((weight * update).to(target.dtype))
                changed += 1
    return changed


def save_base(base, output) -> Path:
    """Save a base (with an adapter baked in): a diffusers pipeline folder, or for SD1.x bases and an output
    ending in .safetensors, one original-layout file that AUTOMATIC1111 / Forge / ComfyUI load."""
    output = Path(output)
    if output.suffix == ".ckpt":
        raise AdapterFormatError(f"-o {output}: sdlora does not write pickle checkpoints; use .safetensors or a folder")
    if output.suffix == ".safetensors":
        if base.family != "sd1":
            raise AdapterFormatError(
                f"-o {output}: single-file output is written for SD1.x bases only (this base is {base.family}); "
                "give a folder name to get a diffusers folder"
            )
        from sdlora.formats.singlefile import save_single_file

        return save_single_file(base, output)
    base.pipeline().save_pretrained(output, safe_serialization=True)
    return output


def bake_files_into(base, read: list[ReadAdapter], rank: int | None = None) -> None:
    """`merge --into-base`: every file at its weight baked into the loaded `base`'s weights, nothing left attached.

    LyCORIS types (`formats.lycoris`) are patched first, each update taken from the original weights as generation
    applies them (`inference.weight_patches`); the plain LoRAs, merged into one, are then added on top. Every
    file is checked to fit before any weight changes."""
    from sdlora.inference.weight_patches import WeightPatches

    models = {base.denoiser_component: base.unet, **base.text_encoders}
    plain = [item for item in read if not isinstance(item.adapter, LycorisFile)]
    merged = merge_files(plain, rank, base=base) if plain else None
    patches = WeightPatches(models)
    weights = {}
    for number, item in enumerate(read):
        if isinstance(item.adapter, LycorisFile):
            patches.add(str(number), item.adapter, item.path)
            weights[str(number)] = (item.spec.unet_weight, item.spec.unet_weight)
    patches.set_weights(weights)  # the originals it keeps are simply dropped: the base is saved as patched
    if merged is not None:
        bake_into(models, merged)

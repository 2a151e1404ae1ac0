"""`sdlora convert`: a layout change (kohya <-> diffusers), or any adapter into a plain LoRA (`--to lora`).

`--to lora` is the bridge for tools that read only LoRA (plain diffusers raises on `hada_*` / `lokr_*` keys and
drops `dora_scale`): each layer's update ΔW, computed as LyCORIS, ComfyUI and A1111 apply it (`formats.deltas`), is
replaced by its truncated SVD (`formats.resize`, `formats.lowrank`), and the file is written in the diffusers layout
that `load_lora_weights` reads. A plain LoRA or LoCon is re-factored the same way, without forming ΔW.

A DoRA layer's update depends on the base weight it rescales (W' = m (W + ΔW) / ||W + ΔW||), so converting a DoRA
needs `--base`. So does a LoHa/LoKr convolution stored flattened when its name does not say its kernel (SD1's 1x1
`proj_in` is a Linear in SD2/SDXL): the base's own weight shapes are then used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.formats import deltas, lowrank
from sdlora.formats.adapter import DTYPES, AdapterFormatError, check_target, convert, read_adapter
from sdlora.formats.adapter import save_adapter as _save
from sdlora.formats.resize import (
    Layer,
    Report,
    check_target_args,
    input_dtype,
    lora_layers,
    original_rank,
    rebuild,
    record,
)
from sdlora.formats.validate import _CROSS_WIDTH as CROSS_WIDTH
from sdlora.formats.validate import declared_family

_CONV_3X3 = {"conv1", "conv2", "conv", "conv_in", "conv_out"}  # UNet ResNet, sampler and outer convolutions
_CONV_1X1 = {"conv_shortcut"}
_PROJECTIONS = {"proj_in", "proj_out"}  # 1x1 convolutions in SD1, Linear layers in SD2 and SDXL


def _kernel_shape(component: str, module: str, delta: torch.Tensor, family: str | None) -> tuple[int, ...] | None:
    """The weight shape of a layer whose ΔW came out flattened, from its name; None when the name cannot say."""
    if delta.dim() != 2 or component != "unet":
        return tuple(delta.shape)
    out, columns = delta.shape
    leaf = module.rsplit(".", 1)[-1]
    if leaf in _CONV_3X3:
        return (out, columns // 9, 3, 3) if columns % 9 == 0 else None
    if leaf in _CONV_1X1:
        return (out, columns, 1, 1)
    if leaf in _PROJECTIONS:
        return {"sd1": (out, columns, 1, 1), "sd2": (out, columns), "sdxl": (out, columns)}.get(family or "")
    return tuple(delta.shape)


def _describe(parts) -> str:
    """What a layer is, for the table's rank column: `loha 8`, `lokr full`, `lora 4 +dora`."""
    algo = deltas.layer_algo(parts)
    inner = {"lora": "lora_down.weight", "loha": "hada_w1_b", "lokr": "lokr_w1_b"}[algo]
    if algo == "lokr" and inner not in parts:
        inner = "lokr_w2_b"
    rank = str(int(parts[inner].shape[0])) if inner in parts else "full"
    return f"{algo} {rank}" + (" +dora" if "dora_scale" in parts else "")


def _base_weights(base_source: str) -> dict[str, dict[str, torch.Tensor]]:
    from sdlora.models import load_base_model

    base = load_base_model(base_source)
    models = {"unet": base.unet, **base.text_encoders}
    return {component: {name: module.weight for name, module in model.named_modules()
                        if isinstance(getattr(module, "weight", None), torch.Tensor)}
            for component, model in models.items()}


def _family(adapter, items) -> str | None:
    """sd1 / sd2 / sdxl from the header, else from the layout: a second text encoder, or the cross-attention width
    (the input of any `attn2.to_k`, 768 / 1024 / 2048 in the real families)."""
    found = declared_family(adapter.metadata)
    if found:
        return found[0]
    if any(component == "text_encoder_2" for component, _, _ in items):
        return "sdxl"
    for component, module, parts in items:
        if component == "unet" and module.endswith("attn2.to_k") and "dora_scale" not in parts:
            return CROSS_WIDTH.get(int(deltas.layer_delta(parts).shape[-1]))
    return None


def lycoris_layers(source, adapter, base: str | None) -> list[Layer]:
    """The layers of a LyCORIS-type file (`formats.lycoris`: per-layer parts) with their ΔW; refused, naming the
    layer, before anything is computed when one needs a base that was not given."""
    items = list(adapter.layer_items())
    dora = [f"{c}.{m}" for c, m, parts in items if "dora_scale" in parts]
    if dora and base is None:
        more = f" and {len(dora) - 1} more" if len(dora) > 1 else ""
        raise AdapterFormatError(f"{source}: convert --to lora of a DoRA needs --base BASE (the model it was trained "
                                 f"on): its update rescales the base's weights ({dora[0]}{more})")
    weights = _base_weights(base) if base is not None else None
    family = _family(adapter, items)
    layers = []
    for component, module, parts in items:
        where = f"{component}.{module}"
        weight = None
        if weights is not None:
            weight = weights.get(component, {}).get(module)
            if weight is None:
                raise AdapterFormatError(f"{source}: layer {where} is not in the base {base}: the adapter was made "
                                         "for another model")

        def delta(parts=parts, weight=weight, component=component, module=module, where=where):
            try:
                change = deltas.layer_delta(parts, shape=None if weight is None else tuple(weight.shape), base=weight)
            except RuntimeError:  # a reshape to the base's weight, or DoRA's rescale, on a weight of another size
                if weight is None:
                    raise
                raise AdapterFormatError(f"{source}: layer {where} does not fit the base {base} (its weight is "
                                         f"{list(weight.shape)}): the adapter was made for another model") from None
            shape = tuple(weight.shape) if weight is not None else _kernel_shape(component, module, change, family)
            if shape is None:
                raise AdapterFormatError(f"{source}: layer {where} stores its convolution flattened and its name does "
                                         "not say the kernel; pass --base BASE to read it off the base")
            return change.reshape(shape)

        def solve(rank, error, delta=delta, where=where):
            return lowrank.factorize(delta(), rank, error, what=f"convert --to lora: layer {where}")

        layers.append(Layer(component, module, _describe(parts), solve))
    return layers


def convert_file(source: str | Path, target: str | Path, to: str, dtype: str | None = None, rank: int | None = None,
                 error: float | None = None, base: str | None = None,
                 progress: bool = False) -> tuple[Path, Report | None]:
    """`to` kohya / diffusers rewrites the layout (no report); `to` lora re-factors every layer into a plain LoRA at
    `rank` (or at a target `error`), in the diffusers layout plain diffusers loads."""
    if to != "lora":
        if rank is not None or error is not None or base is not None:
            raise AdapterFormatError(f"convert --to {to}: --rank, --error and --base only go with --to lora (--to "
                                     f"{to} rewrites the layout and keeps the tensors as they are)")
        return convert(source, target, to, dtype), None
    check_target_args(rank, error, "convert --to lora")
    check_target(target, "convert: output")
    adapter = read_adapter(source)
    if getattr(adapter, "layers", None):  # a LyCORIS type (formats.lycoris.LycorisFile)
        layers = lycoris_layers(source, adapter, base)
        before = ", ".join(sorted({layer.before for layer in layers}))
        stored = next(t.dtype for _, _, parts in adapter.layer_items() for t in parts.values() if t.is_floating_point())
    else:
        layers, before, stored = lora_layers(adapter), original_rank(adapter), input_dtype(adapter)
    plain, report = rebuild(layers, rank, error, adapter.metadata, progress)
    record(plain.metadata, "converted", before, rank, report)
    return _save(target, plain, "diffusers", DTYPES[dtype] if dtype else stored), report

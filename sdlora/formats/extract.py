"""A LoRA from the difference of two checkpoints of one architecture: `sdlora extract` (kohya's
extract_lora_from_models, after cloneofsimo's lora `cli_svd`).

Each target layer's update is ΔW = W_tuned - W_base, replaced by its truncated SVD (`formats.lowrank`). The
layers are the ones kohya's LoRA network wraps, so the file looks like one trained there: in the UNet every Linear
and Conv2d inside a transformer block (`attentions`: proj_in/out, attention, feed-forward); with a conv rank also
the ResNet blocks and the down/up samplers (LoCon: 3x3 convolutions at the conv rank, 1x1 ones and the time
projection at the rank); in the text encoders the attention and MLP Linears. A text encoder is extracted only when
it changed (some weight moved by more than `min_diff`, kohya's rule), since most fine-tunes leave it alone. Layers
whose weights are equal are left out: they would add zero.

By default no value is clamped: the factors are the exact truncated SVD, so a difference of rank <= r comes back to
float precision. kohya clamps both factors to their 0.99 quantile (`clamp_quantile`), which trims outliers at the
cost of a larger, measured error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.config.names import public_name
from sdlora.formats import lowrank
from sdlora.formats.adapter import AdapterFormatError, check_target, save_adapter
from sdlora.formats.resize import Layer, Report, rebuild
from sdlora.models.lora import AdapterMismatchError

UNET_BLOCKS = ("attentions",)
UNET_CONV_BLOCKS = ("resnets", "downsamplers", "upsamplers")
TEXT_BLOCKS = ("self_attn", "mlp")
MIN_DIFF = 0.01  # kohya's default: a text encoder whose weights all moved less than this is the base's


def target_layers(model: torch.nn.Module, blocks: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Linear and Conv2d modules with one of `blocks` in their path, by module path."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and set(name.split(".")) & set(blocks)}


def _same_architecture(base_source: str, tuned_source: str, base, tuned) -> None:
    """Both bases are one family with the same parts, and every weight has the same name and shape."""
    if base.family != tuned.family:
        raise AdapterMismatchError(f"extract: {base_source} is {base.family} but {tuned_source} is {tuned.family}; "
                                   "extract needs two checkpoints of the same architecture")
    parts = {"unet": (base.unet, tuned.unet), **{name: (encoder, tuned.text_encoders.get(name))
                                                  for name, encoder in base.text_encoders.items()}}
    for component, (ours, theirs) in parts.items():
        if theirs is None:
            raise AdapterMismatchError(f"extract: {tuned_source} has no {component} but {base_source} has; extract "
                                       "needs two checkpoints of the same architecture")
        mine, other = ours.state_dict(), theirs.state_dict()
        for key in sorted(set(mine) | set(other)):
            a, b = mine.get(key), other.get(key)
            if a is None or b is None or a.shape != b.shape:
                def shape(t):
                    return "missing" if t is None else list(t.shape)
                raise AdapterMismatchError(
                    f"extract: {component}.{key} is {shape(a)} in {base_source} but {shape(b)} in {tuned_source}; "
                    "extract needs two checkpoints of the same architecture")


def _layers(component: str, base_model, tuned_model, blocks, rank: int, conv_rank: int | None, clamp):
    tuned_modules = dict(tuned_model.named_modules())
    layers = []
    for name, module in target_layers(base_model, blocks).items():
        other = tuned_modules[name]
        if torch.equal(module.weight, other.weight):
            continue
        is_3x3 = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        layer_rank = conv_rank if is_3x3 and conv_rank else rank

        def solve(k, error, ours=module, theirs=other, where=f"{component}.{name}"):
            delta = theirs.weight.detach().float() - ours.weight.detach().float()
            return lowrank.factorize(delta, k, error, clamp_quantile=clamp, what=f"extract: layer {where}")

        layers.append(Layer(component, name, "full", solve, layer_rank))
    return layers


def _moved(base_model, tuned_model, blocks) -> float:
    tuned_modules = dict(tuned_model.named_modules())
    return max((float((tuned_modules[n].weight - m.weight).abs().max()) for n, m in target_layers(base_model, blocks)
                .items()), default=0.0)


def extract(base_source: str, tuned_source: str, rank: int, conv_rank: int | None = None,
            min_diff: float = MIN_DIFF, clamp_quantile: float | None = None, progress: bool = False):
    """(adapter, report, notes): the LoRA taking `base_source` to `tuned_source`, and what was left out."""
    from sdlora.models import load_base_model

    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise AdapterFormatError(f"extract: --rank {rank} / --conv-rank {conv_rank}: ranks must be at least 1")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise AdapterFormatError(f"extract --clamp-quantile {clamp_quantile}: give a quantile in (0, 1], e.g. 0.99")
    base, tuned = load_base_model(base_source), load_base_model(tuned_source)
    if "sd3" in (base.family, tuned.family):
        raise AdapterFormatError("extract: SD3 bases are not supported yet (SD1, SD2 and SDXL are)")
    _same_architecture(base_source, tuned_source, base, tuned)
    unet_blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv_rank else ())
    layers = _layers("unet", base.unet, tuned.unet, unet_blocks, rank, conv_rank, clamp_quantile)
    notes = []
    with torch.no_grad():
        for name, encoder in base.text_encoders.items():
            moved = _moved(encoder, tuned.text_encoders[name], TEXT_BLOCKS)
            if moved > min_diff:
                layers += _layers(name, encoder, tuned.text_encoders[name], TEXT_BLOCKS, rank, None, clamp_quantile)
            else:
                notes.append(f"{name} left out: no weight moved by more than --min-diff {min_diff:g} "
                             f"(largest change {moved:.3g})")
        if not layers:
            raise AdapterFormatError(f"extract: {base_source} and {tuned_source} have the same weights in every layer "
                                     "a LoRA covers; there is nothing to extract")
        metadata = {"sdlora.family": base.family, "sdlora.base_model": base_source}
        adapter, report = rebuild(layers, rank, None, metadata, progress)
    record = {"base": public_name(base_source), "tuned": public_name(tuned_source), "rank": rank,
              "conv_rank": conv_rank, "clamp_quantile": clamp_quantile, "overall_error": report.overall}
    adapter.metadata["sdlora.extracted"] = json.dumps(record, sort_keys=True)
    adapter.metadata["ss_training_comment"] = (f"extracted from {record['base']} -> {record['tuned']} at rank {rank}"
                                               + (f", conv rank {conv_rank}" if conv_rank else ""))
    return adapter, report, notes


def extract_file(base_source: str, tuned_source: str, target: str | Path, rank: int, conv_rank: int | None = None,
                 min_diff: float = MIN_DIFF, clamp_quantile: float | None = None, to: str = "diffusers",
                 dtype: torch.dtype | None = None, progress: bool = False) -> tuple[Path, Report, list[str]]:
    """`sdlora extract`: write the extracted LoRA (checked target first, before any base is loaded)."""
    check_target(target, "extract: output")
    adapter, report, notes = extract(base_source, tuned_source, rank, conv_rank, min_diff, clamp_quantile, progress)
    return save_adapter(target, adapter, to, dtype), report, notes

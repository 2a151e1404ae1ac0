"""LyCORIS-type adapters (LoHa, LoKr, DoRA, LoCon with a Tucker mid) stacked at per-adapter weights.

Mechanism, and why: each touched layer's weight becomes W0 + Σ_i w_i·ΔW_i, computed in float32 from the untouched
W0 (`formats.deltas`) and cast once to the layer's dtype, as ComfyUI and AUTOMATIC1111 apply these files. W0 is
kept (a CPU copy) and copied back bit for bit whenever the weights change or the patches are released, so it is
exact and reversible, and generation runs at the base's speed (a forward hook would rebuild ΔW, or run its factors,
on every call). peft cannot hold these types as files store them (no Tucker LoCon; DoRA and LoKr conventions
differ), so plain LoRA files stay on the peft path (`models.lora`) untouched: a peft layer adds its update to
what its base layer computes, and the base layer is the one patched here, so the two mechanisms add. Every ΔW_i is
taken from W0 alone, DoRA's included (`deltas.dora_weight` at weight s is W0 + s·(DoRA(W0 + ΔW) − W0)), so the
stack equals the sum of each adapter applied on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.formats import deltas, lycoris
from sdlora.formats.validate import base_layers, find_layer
from sdlora.models.lora import AdapterMismatchError

SHOWN = 5
DENOISERS = ("unet", "transformer")


class WeightPatches:
    """Named LyCORIS adapters on one pipeline's components; `set_weights` rewrites the patched layers' weights."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.models = models
        self.adapters: dict[str, list[tuple[str, torch.nn.Module, dict]]] = {}
        self._originals: dict[torch.nn.Module, torch.Tensor] = {}

    def add(self, name: str, adapter: lycoris.LycorisFile, source: str | Path) -> None:
        """Resolve every layer of `adapter` to a base layer it fits; if one does not, nothing is added."""
        resolved, missing, wrong = [], [], []
        found = {component: base_layers(model) for component, model in self.models.items()}
        for component, path, parts in adapter.layer_items():
            layer = find_layer(found[component], path) if component in found else None
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor):
                missing.append(f"{component}.{path}")
                continue
            why = lycoris.check_fit(source, path, parts, tuple(weight.shape))
            if why:
                wrong.append(f"{component}.{path}: {why}")
                continue
            resolved.append((component, layer, {k: v.to(weight.device) for k, v in parts.items()}))
        if wrong:
            more = f" ({len(wrong) - 1} more layer(s) too)" if len(wrong) > 1 else ""
            raise AdapterMismatchError(f"{source}: layer {wrong[0]}{more}; it was made for another base: use the one "
                                       "it was trained on (`sdlora info FILE` names it); nothing was loaded")
        if missing:
            shown = ", ".join(sorted(missing)[:SHOWN]) + (f" and {len(missing) - SHOWN} more"
                                                          if len(missing) > SHOWN else "")
            raise AdapterMismatchError(f"{source}: does not fit the base: {len(missing)} layer(s) are not in it "
                                       f"({shown}); it was made for another base; nothing was loaded")
        self.adapters[name] = resolved

    def set_weights(self, weights: dict[str, tuple[float, float]]) -> None:
        """`{name: (unet_weight, text_encoder_weight)}`; adapters not named are off. Starts from the original W0."""
        self.restore()
        totals: dict[torch.nn.Module, torch.Tensor] = {}
        with torch.no_grad():
            for name, (unet_weight, te_weight) in weights.items():
                for component, layer, parts in self.adapters.get(name, []):
                    w = unet_weight if component in DENOISERS else te_weight
                    if w == 0:
                        continue
                    if layer not in self._originals:
                        self._originals[layer] = layer.weight.detach().to("cpu", copy=True)
                    base = self._originals[layer].to(layer.weight.device)
                    update = deltas.layer_delta(parts, base=base, multiplier=w)
                    totals[layer] = totals[layer] + update if layer in totals else update
            for layer, update in totals.items():
                base = self._originals[layer].to(layer.weight.device)
                layer.weight.copy_((base.to(update.dtype) + update).to(layer.weight.dtype))

    def restore(self) -> None:
        """Every patched layer back to its original weight, bit for bit."""
        with torch.no_grad():
            for layer, original in self._originals.items():
                layer.weight.copy_(original)
        self._originals = {}

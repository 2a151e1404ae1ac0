"""Attach, read, weight and fuse LoRA adapters with peft. Tensors only: no file I/O here.

State dicts are keyed by module path relative to the model, peft-style: `<module>.lora_A.weight` ([r, in]) and
`<module>.lora_B.weight` ([out, r]). Each adapter is applied as W + w * (alpha / r) * B @ A, the arithmetic that
diffusers, ComfyUI and AUTOMATIC1111 share. The LyCORIS types train through peft's own tuners too
(`AdapterShape.kind`): DoRA (`LoraConfig(use_dora=True)`, adds `<module>.lora_magnitude_vector`), LoHa
(`LoHaConfig`: `<module>.hada_w1_a` ...) and LoKr (`LoKrConfig`: `<module>.lokr_w1` ...).

Adapters go in through peft's own functions, the same on a diffusers UNet and a transformers text encoder, not
through the models' `add_adapter`/`load_adapter` integrations: those wrap the same peft calls but refuse to run
unless peft is at least the release each integration was written against (transformers 5.24 asks for a peft 0.22
that does not exist yet), so a bare `pip install` broke every text-encoder LoRA.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdlora.errors import UserError


class AdapterMismatchError(UserError, ValueError):
    """An adapter whose modules or shapes are not in this model: it was made for another base."""


@dataclass(frozen=True)
class AdapterShape:
    """What peft needs to rebuild an adapter on a model: rank, alpha and the module names it wraps."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    kind: str = "lora"  # lora | dora | loha | lokr (config `lora.type`)
    factor: int = -1  # LoKr: peft decompose_factor
    decompose_both: bool = False  # LoKr: the smaller Kronecker factor is a low-rank product too

    def peft_config(self, init: str | bool = True):
        common = dict(r=self.rank, target_modules=list(self.target_modules), rank_pattern=dict(self.rank_pattern),
                      alpha_pattern=dict(self.alpha_pattern))
        if self.kind in ("lora", "dora"):
            return LoraConfig(lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights=init,
                              use_dora=self.kind == "dora", **common)
        # LoHa / LoKr start with a zero update either way (peft zeroes one factor); "gaussian" is a LoRA init.
        # use_effective_conv2d=False keeps a convolution's factors flat ([out, r] x [r, in*k*k]), LyCORIS's non-Tucker
        # layout, so a file holds the same tensors that LyCORIS, ComfyUI and A1111 read.
        lyco = dict(alpha=self.alpha, init_weights=init is not False, use_effective_conv2d=False, **common)
        if self.kind == "loha":
            return LoHaConfig(**lyco)
        if self.kind == "lokr":
            return LoKrConfig(decompose_both=self.decompose_both, decompose_factor=self.factor, **lyco)
        raise AdapterMismatchError(f"adapter type {self.kind!r}: sdlora attaches lora, dora, loha or lokr")


def attach(model: torch.nn.Module, shape: AdapterShape, adapter_name: str = "default", init="gaussian") -> None:
    """Wrap `shape.target_modules` of a diffusers or transformers model with a fresh trainable LoRA.

    peft's default init makes B zero, so the adapter starts as the identity and training moves it; "gaussian"
    (diffusers' training scripts) initialises A with a small normal and keeps B zero.
    """
    _inject(model, shape.peft_config(init=init if shape.kind in ("lora", "dora") else True), adapter_name)


# LoCon's convolutions (kohya's conv_dim): the Conv2d layers of the UNet's ResNet blocks (conv1, conv2,
# conv_shortcut) and of its down- and upsamplers (kohya: ResnetBlock2D, Downsample2D, Upsample2D).
_CONV_TARGET = re.compile(r"^(down_blocks|up_blocks|mid_block)\..*(resnets\.\d+\.(conv1|conv2|conv_shortcut)"
                          r"|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$")


def is_conv_target(module_path: str) -> bool:
    return bool(_CONV_TARGET.match(module_path))


def conv_targets(unet: torch.nn.Module) -> tuple[str, ...]:
    """LoCon's convolutions of this UNet, by full module path."""
    return tuple(name for name, module in unet.named_modules()
                 if isinstance(module, torch.nn.Conv2d) and is_conv_target(name))


def _inject(model: torch.nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """What diffusers' and transformers' `add_adapter` do, minus their peft version gate: wrap the target modules,
    record the config in `model.peft_config`, and make the new adapter the active, trainable one on every layer."""
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise RuntimeError(f"adapter {adapter_name!r} is already attached to this model")
    # A hub id or local path here would make peft's state-dict export look the base's config.json up (on the hub,
    # for an id) to see whether the vocabulary grew; LoRA never resizes embeddings. diffusers sets None too.
    config.base_model_name_or_path = None
    with warnings.catch_warnings():
        # Several named adapters on one model is what stacking is; peft warns each time it finds the dict it left.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name)
    for layer in lora_layers(model):
        layer.set_adapter(adapter_name)
    # The integrations' own methods read this flag (diffusers' set_adapters, transformers' gradient checkpointing,
    # which then keeps the embeddings' output requiring grad so gradients reach the LoRA layers).
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True


def cast_lora_to_fp32(*models: torch.nn.Module) -> None:
    """Frozen weights stay in the compute dtype; trainable LoRA weights are kept in fp32 (diffusers' practice)."""
    for model in models:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed `<module>.lora_A.weight` / `.lora_B.weight`, detached copies on CPU."""
    # sdlora never targets embeddings, so there is no resized vocabulary to save: peft's "auto" would look for the
    # base's config.json (on the Hub when not local) and warn when it cannot find it.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def load_adapter(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], shape: AdapterShape, adapter_name: str
) -> None:
    """Add a named adapter to a model and fill it, failing on any key that does not land (never silently)."""
    advice = "it was made for another base: use the base it was trained on (`sdlora info FILE` names it)"
    try:
        _inject(model, shape.peft_config(init=False), adapter_name)
    except ValueError as exc:  # peft: none of the target modules exist in this model
        delete_adapter(model, adapter_name)
        detail = str(exc).partition(". Please check")[0]  # peft's own advice is about writing a config
        raise AdapterMismatchError(f"adapter {adapter_name!r} does not fit this {type(model).__name__}: {detail}; "
                                   f"{advice}") from None
    try:
        result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    except RuntimeError as exc:  # torch's load_state_dict: same module names, other sizes
        delete_adapter(model, adapter_name)
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise AdapterMismatchError(f"adapter {adapter_name!r} does not fit this {type(model).__name__}: {first}; "
                                   f"{advice}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected_prefix = f".{adapter_name}."
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k and expected_prefix in k]
    if unexpected or missing:
        delete_adapter(model, adapter_name)
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} does not fit this {type(model).__name__}: "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(missing)} missing {missing[:5]}; {advice}"
        )


def fit_text_model_prefix(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module paths as this text encoder names them. Files are read with `text_model.` cut from the first encoder's
    keys (transformers 5's CLIPTextModel has no such level); CLIPTextModelWithProjection, SD3's first encoder,
    keeps it, so it goes back on there."""
    if not hasattr(model, "text_model") or not hasattr(model, "text_projection"):
        return state_dict
    return {key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
            for key, value in state_dict.items()}


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapters_of(layer: BaseTunerLayer):
    """The layer's adapters by name (LoRA's `lora_A`, LoHa's `hada_w1_a`, LoKr's `lokr_w1` or `lokr_w1_a`)."""
    names: dict[str, None] = {}
    for attr in layer.adapter_layer_names:
        names.update(dict.fromkeys(getattr(layer, attr, {}) or {}))
    return names


def _adapter_params(layer: BaseTunerLayer, name: str) -> list[torch.nn.Parameter]:
    params = []
    for attr in layer.adapter_layer_names:
        held = getattr(layer, attr, None)
        if held is not None and name in held:
            item = held[name]
            params.extend(item.parameters() if isinstance(item, torch.nn.Module) else [item])
    return params


def adapter_names(model: torch.nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model):
        names.update(_adapters_of(layer))
    return list(names)


def set_weights(model: torch.nn.Module, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled to w * alpha / r. An empty dict disables all."""
    for layer in lora_layers(model):
        present = [name for name in weights if name in _adapters_of(layer)]
        if not present:
            layer.enable_adapters(False)
            continue
        layer.enable_adapters(True)
        layer.set_adapter(present)
        for name in present:
            layer.set_scale(name, weights[name])
        # set_adapter marks the active adapters trainable; generation never trains them.
        for name in present:
            for param in _adapter_params(layer, name):
                param.requires_grad_(False)


def weight_setter(*models: torch.nn.Module) -> Callable[[float], None]:
    """A function that sets the weight of every adapter in `models` while training: each layer's output scale
    becomes weight x its scale at this call (alpha / r, or alpha / sqrt(r) for rsLoRA), the scale that
    `set_weights` gives generation at that weight. The weights themselves are untouched, so the saved file is the
    same whichever weight a step trained at."""
    scales = [(layer.scaling, name, scale) for model in models for layer in lora_layers(model)
              for name, scale in layer.scaling.items()]

    def set_weight(weight: float) -> None:
        for scaling, name, scale in scales:
            scaling[name] = scale * weight

    return set_weight


def set_trainable(model: torch.nn.Module, adapter_name: str) -> None:
    """Make one adapter's LoRA weights trainable again (peft's set_adapter toggles requires_grad)."""
    for layer in lora_layers(model):
        for param in _adapter_params(layer, adapter_name):
            param.requires_grad_(True)


def delete_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Remove a named adapter. sdlora's callers then set the active adapters themselves (or drop the model), so
    peft's "Adapter X was active which is now deleted. Setting active adapter to Y." (its own interim fallback)
    concerns no user and is filtered, that message only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted", category=UserWarning)
        for layer in lora_layers(model):
            if adapter_name in _adapters_of(layer):
                layer.delete_adapter(adapter_name)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter_name, None)


def fuse(model: torch.nn.Module) -> None:
    """Merge the active adapters (at their current weights) into the base weights for full-speed inference."""
    for layer in lora_layers(model):
        if layer.active_adapters and not layer.disable_adapters:
            layer.merge(adapter_names=list(layer.active_adapters))


def unfuse(model: torch.nn.Module) -> None:
    for layer in lora_layers(model):
        while layer.merged:
            layer.unmerge()


Unwrapped = list[tuple[torch.nn.Module, str, BaseTunerLayer]]


def unwrap(model: torch.nn.Module) -> Unwrapped:
    """Put each LoRA wrapper's base layer back in its place, so the model runs exactly its original modules (no peft
    dispatch per call). Returns what `rewrap` needs to put the wrappers back."""
    unwrapped = []
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, layer.get_base_layer())
            unwrapped.append((parent, attr, layer))
    return unwrapped


def rewrap(unwrapped: Unwrapped) -> None:
    for parent, attr, wrapper in unwrapped:
        setattr(parent, attr, wrapper)

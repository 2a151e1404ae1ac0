"""QLoRA: the frozen base quantized before LoRA is attached; LoRA trains on top in fp32.

- `int8`: weight-only int8 with optimum-quanto (`pip install sdlora[quant]`). It runs on CPU and GPU, and
  quantizes Conv2d as well as Linear layers (an SD UNet holds most of its weights in convolutions). peft wraps
  quanto's QLinear like any Linear, so the adapter's keys are exactly those of a full-precision base.
- `nf4`: bitsandbytes 4-bit NormalFloat (Dettmers et al. 2023, QLoRA) on the Linear layers; CUDA only.

The optional packages are imported only here and only behind the availability checks in `backends`.
"""

from __future__ import annotations

import logging

import torch

from sdlora.errors import UserError
from sdlora.models import backends

log = logging.getLogger(__name__)


class QuantizationError(UserError, RuntimeError):
    """A quantization setting this machine cannot run; the message says what to install or change."""


def quantize_frozen(modules: dict[str, torch.nn.Module], mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize the frozen weights of each module in place (moved to `device` and `dtype` first).

    Call before LoRA is attached, so peft wraps the quantized layers and its adapters stay unquantized.
    """
    if mode == "none":
        return
    if mode == "int8":
        _int8_quanto(modules, device, dtype)
    elif mode == "nf4":
        _nf4_bitsandbytes(modules, device, dtype)
    else:
        raise QuantizationError(f"model.quantize: unknown {mode!r}; choose none, int8 or nf4")


def _int8_quanto(modules: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    if not backends.quanto_available():
        raise QuantizationError(
            "model.quantize=int8 needs optimum-quanto: `pip install sdlora[quant]`, or set model.quantize=none"
        )
    from optimum.quanto import qint8
    from optimum.quanto.nn import QModuleMixin, quantize_module

    for name, module in modules.items():
        # One layer at a time: each is brought to the compute dtype, quantized and frozen before the next, so the
        # whole model never exists in the compute dtype (it may arrive in bf16, see precision.load_dtype_for) and
        # the float and int8 copies of the model never coexist.
        for layer_name, layer in list(module.named_modules()):
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            layer.to(device) if layer.weight.dtype == dtype else layer.to(device, dtype=dtype)
            quantized = quantize_module(layer, weights=qint8, activations=None)
            quantized.freeze()  # the quantized layer's float weight is replaced by int8 data + scales
            layer.weight = layer.bias = None  # the list above still holds the float layer: drop its tensors
            parent_name, _, attr = layer_name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, quantized)
        # What is left (norms, embeddings, biases outside the quantized layers) goes to the compute dtype.
        for part in module.modules():
            if not isinstance(part, QModuleMixin):
                part._apply(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device), recurse=False)
        module.requires_grad_(False)  # freeze() makes new Parameters, which default to requires_grad=True
        log.info("model.quantize=int8: %s weights are int8 (optimum-quanto)", name)


def _nf4_bitsandbytes(modules: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda" or not backends.bitsandbytes_available():
        raise QuantizationError(
            "model.quantize=nf4 needs a CUDA GPU and bitsandbytes (`pip install sdlora[bnb]`); on this machine "
            "use model.quantize=int8 (optimum-quanto) or none"
        )
    import bitsandbytes as bnb

    for name, module in modules.items():
        module.to(dtype=dtype)
        for child_name, child in list(module.named_modules()):
            if type(child) is not torch.nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=dtype,
                quant_type="nf4", device="cpu",
            )
            quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            parent_name, _, attr = child_name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, quantized)
        module.to(device)  # bitsandbytes quantizes Params4bit as they move to the GPU
        # peft reads this flag to wrap Linear4bit layers with its 4-bit LoRA layer.
        module.is_loaded_in_4bit = True
        log.info("model.quantize=nf4: %s Linear weights are NF4 (bitsandbytes)", name)


def frozen_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the frozen weights (quantized tensors count their int8 data and scales)."""
    total = 0
    for param in module.parameters():
        if param.requires_grad:
            continue
        inner = [getattr(param, attr) for attr in ("_data", "_scale") if hasattr(param, attr)]
        if inner:
            total += sum(t.numel() * t.element_size() for t in inner)
        else:
            total += param.numel() * param.element_size()
    return total

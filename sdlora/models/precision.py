"""Which dtype the frozen weights compute in, and which smaller dtype they may be stored in.

`mixed_precision: auto` follows the hardware: bf16 on CUDA GPUs that support it (Ampere and later), fp16 on older
CUDA GPUs (the VAE then stays fp32, see `models.vae_dtype_for`), bf16 on CPUs with native bf16 units (AVX512-BF16 or
AMX), and fp32 on every other CPU: on an AVX2 CPU a bf16 matmul is emulated and runs over 100x slower than fp32.

Weight storage keeps frozen Linear / Conv2d weights in bf16 or fp8 and upcasts each one to the compute dtype only
inside its own forward and backward. diffusers' `enable_layerwise_casting` does this for inference, but in training
autograd keeps the upcast copy of every weight alive until backward (more memory than no casting at all), and its
in-place dtype swap breaks gradient checkpointing's recomputation check. The autograd functions here save the
stored (small) weight and upcast again in backward, so memory stays at the storage size in both modes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.config import ConfigError

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# accelerate's mixed-precision names -> the dtype frozen weights compute in
COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on; detected by `detect_hardware`, built by hand in tests."""

    cuda: bool
    cuda_bf16: bool = False
    cpu_native_bf16: bool = False


def detect_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    cpu_bf16 = False
    # Private but stable helpers (inductor uses them); absent on non-x86 builds, where we stay with fp32.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                cpu_bf16 = cpu_bf16 or bool(check())
            except Exception:  # a probe that cannot run means the feature cannot be relied on
                pass
    return Hardware(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), cpu_native_bf16=cpu_bf16)


def choose_mixed_precision(setting: str, hardware: Hardware) -> str:
    """The accelerate precision name ('no', 'fp16', 'bf16') for a config value, 'auto' resolved for `hardware`."""
    if setting != "auto":
        return setting
    if hardware.cuda:
        return "bf16" if hardware.cuda_bf16 else "fp16"
    return "bf16" if hardware.cpu_native_bf16 else "no"


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` as accelerate names it, 'auto' resolved for this machine; refuses what it cannot run."""
    resolved = choose_mixed_precision(setting, detect_hardware()) if setting == "auto" else setting
    if setting == "auto":
        log.info("train.mixed_precision=auto -> %s", resolved)
    if resolved == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use 'no' (fp32) or 'bf16' on this machine")
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Frozen weights stored smaller than they compute


class _StoredLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class _StoredConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


class _KeepsStorageDtype:
    """`.to(dtype)` on the model moves a stored weight between devices but keeps its storage dtype (as quantized
    layers do), so placing the model in the compute dtype after conversion does not undo the saving. The cast
    happens per layer, so at most one layer's upcast copy exists at a time."""

    def _apply(self, fn, recurse=True):
        storage = self.weight.dtype
        super()._apply(fn, recurse)
        if self.weight.dtype != storage:
            self.weight.data = self.weight.data.to(storage)
        return self


class StoredLinear(_KeepsStorageDtype, torch.nn.Linear):
    """A frozen Linear whose weight lives in a storage dtype; bias and compute stay in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredLinearFn.apply(x, self.weight, self.bias)


class StoredConv2d(_KeepsStorageDtype, torch.nn.Conv2d):
    """A frozen Conv2d whose weight lives in a storage dtype (zero padding, numeric padding only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StoredConv2dFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _stored_copy(module: torch.nn.Module, storage: torch.dtype) -> torch.nn.Module:
    """The same layer as a Stored* module sharing its bias, with the weight cast to `storage`."""
    has_bias = module.bias is not None
    if isinstance(module, torch.nn.Conv2d):
        new = StoredConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, has_bias, device="meta",
        )
    else:
        new = StoredLinear(module.in_features, module.out_features, has_bias, device="meta")
    new.weight = torch.nn.Parameter(module.weight.detach().to(storage), requires_grad=False)
    new.bias = module.bias
    new.train(module.training)
    return new


def _convertible(module: torch.nn.Module) -> bool:
    if type(module) is torch.nn.Linear:
        pass
    elif type(module) is torch.nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    else:
        return False
    return not any(p.requires_grad for p in module.parameters())


def store_frozen_weights(model: torch.nn.Module, storage: str, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the frozen Linear / Conv2d layers of `model` by Stored* layers holding `storage` weights.

    Run after LoRA is attached: trainable layers (LoRA A/B) are never touched, nor are norms or embeddings (small
    and precision-critical). The weights may already be in a small dtype (see `load_dtype_for`): they are wrapped
    without a copy. Returns how many layers were converted.
    """
    if storage == "compute":
        return 0
    dtype = STORAGE_DTYPES[storage]
    if compute_dtype.itemsize <= dtype.itemsize:
        return 0  # computing in a dtype as small as the storage (e.g. bf16 mixed precision): nothing to save
    targets = [(name, module) for name, module in model.named_modules() if _convertible(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _stored_copy(module, dtype))
    converted = sum(isinstance(m, (StoredLinear, StoredConv2d)) for m in model.modules())
    log.info("weight storage %s: %d frozen layers of %s", storage, converted, type(model).__name__)
    return converted


def load_dtype_for(storage: str, compute_dtype: torch.dtype, quantize: str = "none") -> torch.dtype:
    """The dtype to load the frozen UNet and text encoders in. With smaller storage they load in bf16 straight
    from the file, so the full fp32 model never exists in memory (SD1.5: 3.4 GB -> 1.7 GB at load); fp8 storage
    rounds those bf16 values once more. An int8 base loads in bf16 too and is upcast one layer at a time while
    it is quantized (`quantize._int8_quanto`). Otherwise (NF4, or already a 16-bit compute dtype): the compute
    dtype."""
    smaller = storage != "compute" or quantize == "int8"
    if smaller and quantize != "nf4" and compute_dtype.itemsize > 2:
        return torch.bfloat16
    return compute_dtype

"""Random, non-zero LoRA adapters for tests (a zero adapter would pass every equality test without proving anything)."""

from __future__ import annotations

import torch

from sdlora.formats import AdapterFile
from sdlora.models.lora import AdapterShape

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def linear_modules(model: torch.nn.Module, targets: tuple[str, ...] | None) -> dict[str, torch.nn.Module]:
    """Module paths ending in one of `targets` (None: every Linear and Conv2d), as peft would match them."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if targets is None or any(name == t or name.endswith("." + t) for t in targets):
            found[name] = module
    return found


def random_lora(modules: dict[str, torch.nn.Module], rank: int, generator: torch.Generator, std: float,
                size_one: bool = False) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in modules.items():
        if size_one:  # naming tests on the full SD1.5 / SDXL module lists only need the keys
            a, b = torch.zeros(rank, 1), torch.zeros(1, rank)
        elif isinstance(module, torch.nn.Conv2d):
            a = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * std
            b = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * std
        else:
            a = torch.randn(rank, module.in_features, generator=generator) * std
            b = torch.randn(module.out_features, rank, generator=generator) * std
        tensors[f"{name}.lora_A.weight"] = a
        tensors[f"{name}.lora_B.weight"] = b
    return tensors


def make_adapter(unet, text_encoder=None, *, rank=4, alpha=8.0, seed=0, std=0.3, unet_targets=UNET_TARGETS,
                 te_targets=TE_TARGETS, text_encoder_2=None, family="sd1", size_one=False) -> AdapterFile:
    generator = torch.Generator().manual_seed(seed)
    tensors, shapes = {}, {}
    for component, model, targets in (("unet", unet, unet_targets), ("text_encoder", text_encoder, te_targets),
                                      ("text_encoder_2", text_encoder_2, te_targets)):
        if model is None:
            continue
        modules = linear_modules(model, targets)
        tensors[component] = random_lora(modules, rank, generator, std, size_one)
        shapes[component] = AdapterShape(rank, float(alpha), tuple(sorted(modules)))
    return AdapterFile(tensors=tensors, shapes=shapes, metadata={"sdlora.family": family})

"""Adapters of every type attached to tiny models through sdlora's own code, made non-zero, and written as a run
writes them: shared by the LyCORIS-equivalence and the key-convention tests."""

from __future__ import annotations

import torch

from sdlora import formats
from sdlora.config.model import LoraSection
from sdlora.formats import lycoris_write
from sdlora.formats.adapter import AdapterFile
from sdlora.models import lora
from sdlora.models.prepare import adapter_shape

# name -> LoraSection fields. Alphas differ from ranks so a wrong alpha / r convention shows.
CASES = {
    "lora": dict(rank=4, alpha=2.0),
    "locon": dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
    "dora": dict(type="dora", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0),
    "loha": dict(type="loha", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
    # rank 4 on the tiny widths: both Kronecker factors full (LyCORIS scale 1, alpha / r folded into lokr_w1)
    "lokr": dict(type="lokr", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
    # rank 2 with decompose_both: w2 (and on 64-wide layers w1) low-rank, LyCORIS reads r off them
    "lokr-decomposed": dict(type="lokr", rank=2, alpha=3.0, decompose_both=True, conv_rank=2, conv_alpha=1.0),
}


class WithTextModel(torch.nn.Module):
    """transformers 5's CLIPTextModel has no `text_model.` level; kohya names (and sdlora's) carry it."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


def nonzero(model: torch.nn.Module, seed: int) -> None:
    """Adapters start as the identity; random factors (magnitudes moved off the base norms) make them act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(param * (1 + 0.2 * noise) if "lora_magnitude_vector" in name else 0.3 * noise)


def save_case(case: str, family: str, models: dict[str, torch.nn.Module], path, layout: str = "kohya"):
    """Attach the case's adapter as a run does, make it non-zero, and write it: `layout` "run" as a run writes its
    adapter (plain LoRA / LoCon in diffusers layout), "kohya" as the kohya/LyCORIS file (`output.kohya` for those)."""
    section = LoraSection(**CASES[case])
    tensors, shapes = {}, {}
    for seed, (component, model) in enumerate(models.items()):
        targets = section.unet_targets if component == "unet" else section.text_encoder_targets
        convs = lora.conv_targets(model) if component == "unet" and section.conv_rank else ()
        lora.attach(model, adapter_shape(section, targets, convs))
        nonzero(model, seed)
        tensors[component] = lora.lora_state_dict(model)
        if section.type == "lora" and section.conv_rank is None:
            shapes[component] = formats.shape_from_tensors(tensors[component], section.effective_alpha)
        else:
            shapes[component] = lycoris_write.trained_shape(
                tensors[component], kind=section.type, rank=section.rank, alpha=section.effective_alpha,
                conv_rank=section.conv_rank if component == "unet" else None,
                conv_alpha=section.effective_conv_alpha, factor=section.factor,
                decompose_both=section.decompose_both)
    adapter = AdapterFile(tensors, shapes, {"sdlora.family": family})
    if section.type == "lora" and layout == "kohya":  # plain LoRA and LoCon: the `output.kohya` copy
        return formats.save_kohya(path, adapter)
    return lycoris_write.save_trained(path, adapter)

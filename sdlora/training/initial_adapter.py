"""Continue from an adapter: the run's LoRA starts from the weights of an existing file (`lora.init_from`) instead
of a fresh initialisation, then trains as usual.

Any layout sdlora reads works (diffusers/peft or kohya / A1111 / ComfyUI). The file must have this run's shape:
the same rank and alpha (otherwise the same numbers would mean a different update) and the same target modules,
checked key by key: nothing is loaded half. This is a new run from those weights, with a fresh optimizer and
schedule; to continue an interrupted run exactly, resume its checkpoint (`--resume`) instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict

from sdlora import formats
from sdlora.config import ConfigError, LoraSection
from sdlora.models.lora import AdapterMismatchError

log = logging.getLogger(__name__)


def load_initial_adapter(lora: LoraSection, models: dict[str, torch.nn.Module]) -> None:
    """Fill the freshly attached LoRA of `models` (by adapter component: unet, text_encoder, ...) from
    `lora.init_from`. A component the file lacks keeps its fresh initialisation (a UNet-only file continued with
    text-encoder training); one the run does not train is refused."""
    path = Path(lora.init_from)
    if not path.is_file():
        raise ConfigError(f"lora.init_from: {path} does not exist; name an adapter .safetensors file")
    adapter = formats.read_adapter(path)
    if not adapter.components:  # a LoHa/LoKr/DoRA file (formats.lycoris) has no LoRA pairs to start from
        raise ConfigError(f"lora.init_from: {path} holds no plain LoRA layers (it is a LyCORIS-type adapter); start "
                          "from a LoRA file")
    extra = [c for c in adapter.components if c not in models]
    if extra:
        raise ConfigError(f"lora.init_from: {path} holds a {extra[0]} LoRA, which this run does not train: set "
                          "lora.train_text_encoder=true, or start from a UNet-only adapter")
    for component in adapter.components:
        shape = adapter.shapes[component]
        if shape.rank_pattern or shape.alpha_pattern or shape.rank != lora.rank or shape.alpha != lora.effective_alpha:
            raise ConfigError(
                f"lora.init_from: {path} has rank {shape.rank} and alpha {shape.alpha:g} in its {component} LoRA"
                f"{' (varying by module)' if shape.rank_pattern or shape.alpha_pattern else ''}, this run "
                f"lora.rank={lora.rank} and lora.alpha={lora.effective_alpha:g}: set lora.rank and lora.alpha to "
                "the file's"
            )
        _fill(models[component], adapter.tensors[component], f"lora.init_from: {path} ({component})")
    fresh = [c for c in models if c not in adapter.components]
    log.info("LoRA initialised from %s%s", path, f"; {', '.join(fresh)} start fresh" if fresh else "")


def _fill(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    try:
        result = set_peft_model_state_dict(model, tensors, adapter_name="default")
    except RuntimeError as exc:  # torch's load_state_dict: the same modules at other sizes
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise AdapterMismatchError(f"{where} does not fit this run's LoRA: {first}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k and ".default." in k]
    if unexpected or missing:
        raise AdapterMismatchError(
            f"{where} does not fit this run's LoRA ({len(unexpected)} keys it has that the run lacks, e.g. "
            f"{unexpected[:2]}; {len(missing)} the run has that it lacks, e.g. {missing[:2]}): set lora.unet_targets "
            "/ lora.text_encoder_targets to the modules it was trained on, or train on the base it was made for"
        )

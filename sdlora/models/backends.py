"""Optional accelerators, imported only behind an availability check (peft's `bnb.py` pattern).

xformers and bitsandbytes are CUDA-first packages; importing them on a CPU machine can fail or print noise, so the
rest of sdlora asks here and never imports them directly.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from sdlora.config import ConfigError


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a build for another torch/CUDA raises all sorts of errors on import
        return False
    return True


@functools.lru_cache(maxsize=None)
def bitsandbytes_available() -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def adamw_8bit_class():
    """bitsandbytes' 8-bit AdamW, or a clear error saying how to get it."""
    if not bitsandbytes_available():
        raise ConfigError(
            "train.optimizer: adamw8bit needs bitsandbytes: `pip install sdlora[bnb]` (CUDA), "
            "or set train.optimizer=adamw"
        )
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit


@functools.lru_cache(maxsize=None)
def quanto_available() -> bool:
    """optimum-quanto, the int8 weight-only backend of `model.quantize=int8` (runs on CPU)."""
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        return False
    try:
        import optimum.quanto  # noqa: F401
    except Exception:
        return False
    return True

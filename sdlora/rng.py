"""Every random stream a run draws from, captured and put back: Python's, numpy's, torch's (CPU and CUDA) and any
named `torch.Generator`s.

Checkpoints store the capture so a resumed run draws what an uninterrupted one would; previews wrap their sampling
in `isolated()` so a run with sample images draws the same as one without.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back a `capture()`, also one that went through JSON (tuples became lists)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    for name, generator in (generators or {}).items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Whatever the block draws, the global streams leave it as they entered."""
    state = capture()
    try:
        yield
    finally:
        restore(state)

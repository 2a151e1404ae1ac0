"""The Generate tab's work: a base with stacked adapters at their weights, through the same `sdlora.inference`
calls `sdlora generate` makes; each image is saved with its parameters in its PNG text chunks."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdlora import inference


def parameters_text(prompt: str, seed: int, steps: int, guidance: float, base: str,
                    adapters: list[tuple[str, float]]) -> str:
    """A1111's `parameters` text (what its PNG-info tab and most image browsers show), `<lora:…>` tags included."""
    tags = "".join(f" <lora:{inference.AdapterSpec(path).name}:{weight:g}>" for path, weight in adapters)
    return f"{prompt}{tags}\nSteps: {steps}, Sampler: ddim, CFG scale: {guidance:g}, Seed: {seed}, Model: {base}"


def generate(base: str, prompt: str, seed: int, steps: int, guidance: float, adapters: list[tuple[str, float]],
             out_dir: Path, threads: int | None = None) -> Path:
    """One image; returns the PNG written under `out_dir`. `threads` caps torch's threads in this (the UI's)
    process, so a generation beside a training shares the cores instead of fighting over them."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    from sdlora.hub import resolve_adapter
    from sdlora.models import load_base_model

    if threads:
        torch.set_num_threads(threads)  # process-wide, on purpose: the UI process only ever generates
    specs = [inference.AdapterSpec(path, float(weight)) for path, weight in adapters]
    choice = inference.choose_base(base or None, specs, resolve=resolve_adapter)
    device, dtype = inference.generation_device()
    pipe = inference.build_pipeline(load_base_model(choice.source), device=device, dtype=dtype)
    inference.stack_adapters(pipe, specs, resolve=resolve_adapter)
    image = inference.generate(pipe, prompt, seed=int(seed), steps=int(steps), guidance_scale=float(guidance))[0]
    meta = PngInfo()
    meta.add_text("parameters", parameters_text(prompt, int(seed), int(steps), float(guidance), choice.source, adapters))
    meta.add_text("sdlora", json.dumps({"base": choice.source, "prompt": prompt, "seed": int(seed), "steps": int(steps),
                                        "guidance_scale": float(guidance),
                                        "adapters": [{"path": str(p), "weight": float(w)} for p, w in adapters]}))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{int(seed)}.png"
    image.save(path, pnginfo=meta)
    return path

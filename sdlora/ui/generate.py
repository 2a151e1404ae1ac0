"""The Generate tab's work: a base with stacked adapters at their weights (UNet and text encoder), `<lora:name:w>`
tags in the prompt and an XY grid over weights, through the same `sdlora.inference` calls `sdlora generate` and
`sdlora grid` make; each image is saved with its parameters in its PNG text chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sdlora import inference
from sdlora.inference import grid as grids


@dataclass(frozen=True)
class Request:
    base: str  # "" : the base the adapters record
    prompt: str  # may hold <lora:name:w> tags, resolved in `lora_dir`
    seed: int
    steps: int
    guidance: float
    adapters: list[inference.AdapterSpec]  # from the adapter rows (paths already checked against the roots)
    lora_dir: Path | None = None
    grid_adapter: int | None = None  # adapter number (rows first, then tags) whose weight the grid's columns vary
    grid_values: str = ""  # `0,0.5,1` or `0:1:0.25`, as `sdlora grid --x-values`


def plan(request: Request) -> tuple[str, list[inference.AdapterSpec], grids.Axis | None]:
    """The prompt without its tags, every adapter (rows, then tags, as `sdlora generate` orders --lora and tags) and
    the grid's column axis: all checked before the base loads, so a typo costs no model load."""
    prompt, tagged = inference.prompt_specs(request.prompt, request.lora_dir)
    specs = [*request.adapters, *tagged]
    axis = None
    if request.grid_values.strip():
        axis = grids.axis_from_text(f"weight:{request.grid_adapter or 0}", request.grid_values, "grid", len(specs))
    return prompt, specs, axis


def parameters_text(request: Request, specs: list[inference.AdapterSpec], base: str, axis=None) -> str:
    """A1111's `parameters` text (what its PNG-info tab and most image browsers show): the prompt with every adapter
    as a `<lora:name:unet>` (or `<lora:name:te:unet>` when the text-encoder weight differs) tag."""
    prompt, _ = inference.parse_prompt_loras(request.prompt)
    tags = "".join(f" <lora:{s.name}:{s.unet_weight:g}>" if s.te_weight == s.unet_weight
                   else f" <lora:{s.name}:{s.te_weight:g}:{s.unet_weight:g}>" for s in specs)
    grid = f", XY grid: {specs[axis.adapter].name} weight {', '.join(f'{v:g}' for v in axis.values)}" if axis else ""
    return (f"{prompt}{tags}\nSteps: {request.steps}, Sampler: ddim, CFG scale: {request.guidance:g}, "
            f"Seed: {request.seed}, Model: {base}{grid}")


def generate(request: Request, out_dir: Path, threads: int | None = None) -> tuple[Path, str]:
    """One image (or one grid); returns the PNG written under `out_dir` and its parameters text. `threads` caps
    torch's threads in this (the UI's) process, so a generation beside a training shares the cores."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    from sdlora.hub import resolve_adapter
    from sdlora.models import load_base_model

    prompt, specs, axis = plan(request)
    adapters = inference.read_adapters(specs, resolve=resolve_adapter)  # a damaged file fails before the base loads
    if threads:
        torch.set_num_threads(threads)  # process-wide, on purpose: the UI process only ever generates
    choice = inference.choose_base(request.base or None, specs, resolve=resolve_adapter)
    device, dtype = inference.generation_device()
    pipe = inference.build_pipeline(load_base_model(choice.source), device=device, dtype=dtype)
    stack = inference.stack_adapters(pipe, adapters)
    settings = dict(steps=request.steps, guidance_scale=request.guidance)
    if axis is None:
        image = inference.generate(pipe, prompt, seed=request.seed, **settings)[0]
    else:
        image = grids.render(pipe, stack, specs, axis, None, prompt, request.seed, **settings)
    text = parameters_text(request, specs, choice.source, axis)
    meta = PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("sdlora", json.dumps({
        "base": choice.source, "prompt": request.prompt, "seed": request.seed, "steps": request.steps,
        "guidance_scale": request.guidance,
        "adapters": [{"path": str(s.source), "weight": s.unet_weight, "text_encoder_weight": s.te_weight}
                     for s in specs],
        **({"grid": {"adapter": axis.adapter, "weights": list(axis.values)}} if axis else {})}))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{request.seed}{'-grid' if axis else ''}.png"
    image.save(path, pnginfo=meta)
    return path, text

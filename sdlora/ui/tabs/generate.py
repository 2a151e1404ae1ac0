"""Generate tab: base, prompt (with `<lora:name:w>` tags resolved in a LoRA folder), seed, steps, guidance; up to
three adapters, each with a weight and a text-encoder weight; an optional XY grid over one adapter's weight."""

from __future__ import annotations

import os

import gradio as gr

from sdlora import inference
from sdlora.errors import UserError
from sdlora.ui import generate as generation
from sdlora.ui import runs
from sdlora.ui.app import Settings
from sdlora.ui.paths import inside_roots

ADAPTER_ROWS = 3


def adapter_choices(settings: Settings) -> list[str]:
    return [str(p) for r in runs.list_runs(settings.runs_root) for p in sorted(r.folder.glob("*.safetensors"))]


def request_of(settings: Settings, base, prompt, seed, steps, guidance, lora_dir, grid_adapter, grid_values,
               rows) -> generation.Request:
    """The page's values as a generation request; every path (adapters, LoRA folder) checked against the roots."""
    specs = []
    for path, weight, te_weight in zip(rows[::3], rows[1::3], rows[2::3]):
        if path:
            specs.append(inference.AdapterSpec(str(inside_roots(path, settings.readable)), float(weight),
                                               float(te_weight)))
    folder = inside_roots(lora_dir, settings.readable) if str(lora_dir or "").strip() else None
    return generation.Request(base or "", prompt or "", int(seed or 0), int(steps), float(guidance), specs, folder,
                              int(grid_adapter or 0), grid_values or "")


def build(settings: Settings) -> None:
    with gr.Row():
        base = gr.Textbox(label="Base (empty: the one the adapters were trained on)", elem_id="gen-base")
        prompt = gr.Textbox(label="Prompt (<lora:name:w> or <lora:name:te_w:unet_w> tags add adapters)", scale=3,
                            elem_id="gen-prompt")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        steps = gr.Slider(1, 100, 20, step=1, label="Steps", elem_id="gen-steps")
        guidance = gr.Slider(1, 15, 7.5, step=0.5, label="Guidance")
        lora_dir = gr.Textbox(str(settings.runs_root), label="LoRA folder (where <lora:name> tags are found)",
                              elem_id="gen-lora-dir")
    rows = []
    for number in range(ADAPTER_ROWS):
        with gr.Row():
            rows.append(gr.Dropdown(adapter_choices(settings), label=f"Adapter {number}", scale=4,
                                    allow_custom_value=True, elem_id=f"adapter-{number}"))
            rows.append(gr.Slider(-2, 2, 1.0, step=0.05, label="Weight (UNet)", elem_id=f"weight-{number}"))
            rows.append(gr.Slider(-2, 2, 1.0, step=0.05, label="Text-encoder weight", elem_id=f"te-weight-{number}"))
    with gr.Row():
        grid_adapter = gr.Number(0, label="XY grid: adapter number (rows first, then tags)", precision=0,
                                 elem_id="grid-adapter")
        grid_values = gr.Textbox(label="XY grid: its weights (0,0.5,1 or 0:1:0.25; empty: one image)",
                                 elem_id="grid-values")
    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
    result = gr.Image(label="Result", type="filepath", elem_id="gen-result")
    used = gr.Textbox(label="Saved with these parameters (PNG text)", elem_id="gen-info")

    def run_generation(base_text, prompt_text, seed_value, step_count, scale, folder, adapter, values, *pairs):
        try:
            request = request_of(settings, base_text, prompt_text, seed_value, step_count, scale, folder, adapter,
                                 values, pairs)
            # A training has the cores: generate on one thread beside it, never fight it for all of them.
            threads = 1 if runs.training(settings.runs_root) else (os.cpu_count() or 1)
            out, text = generation.generate(request, settings.images, threads)
        except UserError as exc:
            raise gr.Error(str(exc))
        return str(out), text

    generate_button.click(run_generation, [base, prompt, seed, steps, guidance, lora_dir, grid_adapter, grid_values,
                                           *rows], [result, used], api_name="generate")
    refresh = gr.Button("Refresh adapter list", size="sm")
    refresh.click(lambda: [gr.update(choices=adapter_choices(settings))] * ADAPTER_ROWS, None, rows[::3],
                  api_name=False)


"""The offline demo: on the shipped `sdlora:shapes` base, train a style LoRA (stripes) and a subject LoRA (a
ring with the trigger word "sks") on CPU, then write a labelled grid: base / style / subject / both stacked.
Everything it needs ships with sdlora; nothing is downloaded.

    python scripts/demo.py [--out runs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sdlora import inference
from sdlora.config import load_config
from sdlora.hostmem import settle_host_memory
from sdlora.models import load_base_model
from sdlora.workflow import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a red sks ring on a blue background, striped style",
    "a yellow square on a green background, striped style",
    "a white sks ring on a red background, striped style",
)
# (label, style weight, subject weight)
COLUMNS = (("base", 0.0, 0.0), ("style 1.0", 1.0, 0.0), ("subject 1.0", 0.0, 1.0), ("both 0.8 + 1.0", 0.8, 1.0))


def train_adapter(name: str, out: Path, steps: int | None) -> Path:
    overrides = [f"data.path={ROOT / 'datasets' / f'demo-{name}'}", f"output.dir={out / name}"]
    if steps:
        overrides.append(f"train.steps={steps}")
    return train(load_config(ROOT / "configs" / f"demo-{name}.yaml", overrides)).adapter_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, help="override train.steps of both LoRAs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    style = train_adapter("style", args.out, args.steps)
    subject = train_adapter("subject", args.out, args.steps)

    pipe = inference.build_pipeline(load_base_model("sdlora:shapes"))
    settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(style)), inference.AdapterSpec(str(subject))])
    images = []
    for prompt in PROMPTS:
        for _, style_weight, subject_weight in COLUMNS:
            stack.set_weights({stack.names[0]: (style_weight,) * 2, stack.names[1]: (subject_weight,) * 2})
            images += inference.generate(pipe, prompt, seed=3, steps=25, guidance_scale=5.0)
    grid = inference.image_grid(
        [im.resize((128, 128), resample=0) for im in images], columns=len(COLUMNS),
        row_labels=[p.split(" on ")[0] for p in PROMPTS], column_labels=[c[0] for c in COLUMNS],
    )
    grid_path = args.out / "demo_grid.png"
    grid.save(grid_path)
    print(f"style adapter:   {style}\nsubject adapter: {subject}\ngrid:            {grid_path}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

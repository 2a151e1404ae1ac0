"""The offline demo: train a style LoRA on the bundled dataset on CPU, then render a labelled grid of the base and
the adapter at several weights. Everything it needs ships with sdlora; nothing is downloaded.

    python scripts/demo.py [--out runs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sdlora import inference
from sdlora.config import load_config
from sdlora.models import load_base_model
from sdlora.run import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle on a blue background", "a yellow square on a black background")
WEIGHTS = (0.0, 0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, help="override train.steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    overrides = [f"data.path={ROOT / 'datasets' / 'demo-style'}", f"output.dir={args.out / 'style'}"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
    result = train(config)

    pipe = inference.build_pipeline(load_base_model(config.model.base))
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(result.adapter_path))])
    images, labels = [], []
    for prompt in PROMPTS:
        for weight in WEIGHTS:
            stack.set_weights({stack.names[0]: (weight, weight)})
            images += inference.generate(pipe, prompt, seed=7, steps=config.sample.steps,
                                         guidance_scale=config.sample.guidance_scale, height=64, width=64)
        labels.append(prompt.split(" on ")[0])
    grid = inference.image_grid(images, columns=len(WEIGHTS), row_labels=labels,
                                column_labels=[f"style {w:g}" for w in WEIGHTS])
    grid_path = args.out / "demo_grid.png"
    grid.save(grid_path)
    print(f"adapter: {result.adapter_path}")
    print(f"grid:    {grid_path}")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

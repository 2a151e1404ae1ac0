"""The offline demo: on the shipped `sdlora:shapes` base, train a style LoRA (stripes) and a subject LoRA (a
ring with the trigger word "sks") on CPU, then write a labelled grid: base / style / subject / both stacked.
Everything it needs ships with sdlora; nothing is downloaded.

    python scripts/demo.py [--out runs/demo] [--steps N] [--fresh]

Ctrl-C or SIGTERM stops the demo: a training in progress finishes its step and writes a checkpoint, then the demo
exits (status 75) without starting the next training or drawing a grid from a half-trained adapter. Running the
same command again resumes where it stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from sdlora import inference
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.hostmem import settle_host_memory
from sdlora.models import load_base_model
from sdlora.training.checkpoint import latest_checkpoint
from sdlora.training.interrupt import EXIT_STOPPED
from sdlora.workflow import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a red sks ring on a blue background, striped style",
    "a yellow square on a green background, striped style",
    "a white sks ring on a red background, striped style",
)
# (label, style weight, subject weight)
COLUMNS = (("base", 0.0, 0.0), ("style 1.0", 1.0, 0.0), ("subject 1.0", 0.0, 1.0), ("both 0.8 + 1.0", 0.8, 1.0))


class Stopped(Exception):
    """The user asked the demo to stop (Ctrl-C / SIGTERM)."""


def _stop_now(signum: int, frame) -> None:
    # Outside a training (loading, drawing the grid) nothing is worth finishing: stop at once. During a training
    # sdlora's own handler is in place instead (finish the step, checkpoint) and the demo stops after it returns.
    raise Stopped(signal.Signals(signum).name)


def train_adapter(name: str, out: Path, steps: int | None, fresh: bool) -> Path:
    """Train one demo adapter, resuming from its latest checkpoint when an earlier demo was stopped. The demo
    configs checkpoint every 100 steps and at the end, so a re-run of a finished demo trains nothing."""
    # No sample pictures during training: the demo draws its own pictures from the finished adapters.
    overrides = [f"data.path={ROOT / 'datasets' / f'demo-{name}'}", f"output.dir={out / name}", "sample.prompts=[]"]
    if steps:  # a shortened run keeps the warmup a small part of it (the configs warm up for 20 steps)
        overrides += [f"train.steps={steps}", f"train.lr_warmup_steps={min(20, steps // 5)}"]
    config = load_config(ROOT / "configs" / f"demo-{name}.yaml", overrides)
    # Without a checkpoint the folder holds nothing resumable (at most an adapter of a run stopped before its
    # first step): start over there. A checkpoint of other settings (another --steps) is refused with one line.
    resume = None if fresh or latest_checkpoint(out / name / "checkpoints") is None else "latest"
    result = train(config, resume=resume, overwrite=resume is None)
    if result.stopped_by:
        raise Stopped(f"{result.stopped_by} at step {result.final_step} of the {name} adapter (checkpoint written)")
    return result.adapter_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, help="override train.steps of both LoRAs")
    parser.add_argument("--fresh", action="store_true", help="start both trainings over instead of resuming")
    parser.add_argument("--grid-steps", type=int, default=25, help="denoising steps of each picture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_now)
    again = " ".join(a for a in sys.argv if a != "--fresh")
    try:
        run(args)
    except Stopped as stop:
        print(f"demo stopped by {stop}; run it again to resume:\n  python {again}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except UserError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)


def run(args) -> None:
    started = time.perf_counter()
    style = train_adapter("style", args.out, args.steps, args.fresh)
    subject = train_adapter("subject", args.out, args.steps, args.fresh)

    pipe = inference.build_pipeline(load_base_model("sdlora:shapes"))
    settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(style)), inference.AdapterSpec(str(subject))])
    images = []
    for prompt in PROMPTS:
        for _, style_weight, subject_weight in COLUMNS:
            stack.set_weights({stack.names[0]: (style_weight,) * 2, stack.names[1]: (subject_weight,) * 2})
            images += inference.generate(pipe, prompt, seed=3, steps=args.grid_steps, guidance_scale=5.0)
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

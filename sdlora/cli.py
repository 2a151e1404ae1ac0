"""The `sdlora` command: one short function per subcommand. Parse, load config, call the library; no logic here."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger("sdlora")


def cmd_train(args: argparse.Namespace) -> int:
    from sdlora.config import load_config
    from sdlora.run import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    print(f"adapter: {result.adapter_path}")
    for sample in result.samples:
        print(f"samples: {sample}")
    if result.stopped_by:
        from sdlora.interrupt import EXIT_STOPPED

        again = shlex.join(["sdlora", "train", str(args.config), *args.overrides, "--resume", "latest"])
        print(f"stopped by {result.stopped_by} at step {result.final_step}, checkpoint written; resume with:\n  {again}")
        return EXIT_STOPPED
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlora import inference
    from sdlora.models import load_base_model

    specs = [inference.AdapterSpec.parse(text) for text in args.lora]
    pipe = inference.build_pipeline(load_base_model(args.base), scheduler=args.scheduler)
    stack = inference.stack_adapters(pipe, specs)
    if args.fuse:
        stack.fuse()
    images = inference.generate(
        pipe, args.prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, num_images=args.num_images,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(args.output)
    else:
        inference.image_grid(images, columns=len(images)).save(args.output)
    print(f"image: {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train, stack and share Stable Diffusion LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA from a config file")
    train.add_argument("config", type=Path, help="run config (.yaml or .toml)")
    train.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=500")
    train.add_argument("--resume", help="'latest' or a checkpoint folder (runs/x/checkpoints/step-000100)")
    train.set_defaults(func=cmd_train)

    gen = commands.add_parser("generate", help="generate images with stacked adapters")
    gen.add_argument("--base", default="sdlora:tiny", help="base model: hub id, folder, .safetensors or sdlora:NAME")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:W_TE]]",
                     help="adapter with weight (and text-encoder weight); repeat to stack")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--scheduler", default="ddim", help="ddim, euler, euler_a, dpm++, ddpm")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--fuse", action="store_true", help="fuse adapters into the base weights (faster)")
    gen.add_argument("-o", "--output", type=Path, default=Path("sdlora.png"))
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Errors a user can fix (bad config, missing folder, unreadable file) end with one clear line, no traceback.
    from sdlora.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"sdlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from sdlora.interrupt import EXIT_ABORTED

        print("sdlora: interrupted; no checkpoint was written for the unfinished step", file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())

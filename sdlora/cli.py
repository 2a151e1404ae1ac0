"""The `sdlora` command: one short function per subcommand. Parse, load config, call the library; no logic here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import sdlora

log = logging.getLogger("sdlora")
DTYPE_NAMES = ("fp16", "bf16", "fp32")


def cmd_train(args: argparse.Namespace) -> int:
    from sdlora.config import load_config

    config = load_config(args.config, args.overrides)  # before torch is imported: a bad config fails in a second
    from sdlora.workflow import train

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"adapter: {result.adapter_path}")
    for sample in result.samples:
        print(f"samples: {sample}")
    if result.stopped_by:
        from sdlora.training.interrupt import EXIT_STOPPED

        again = sdlora.command_line("train", str(args.config), *args.overrides, "--resume", "latest")
        print(f"stopped by {result.stopped_by} at step {result.final_step}, checkpoint written; resume with:\n  {again}")
        return EXIT_STOPPED
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlora import inference
    from sdlora.hub import resolve_adapter

    prompt, prompt_specs = inference.prompt_specs(args.prompt, args.lora_dir)
    specs = [inference.AdapterSpec.parse(text) for text in args.lora] + prompt_specs
    adapters = inference.read_adapters(specs, resolve=resolve_adapter)  # a damaged file fails before the base loads
    pipe = _generation_pipeline(args, inference.choose_base(args.base, specs, resolve=resolve_adapter),
                                progress=True)
    stack = inference.stack_adapters(pipe, adapters)
    if args.fuse:
        stack.fuse(reversible=False)  # one shot: no copy of the original weights kept for an unfuse
    images = inference.generate(
        pipe, prompt, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, num_images=args.num_images,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(args.output)
    else:
        inference.image_grid(images, columns=len(images)).save(args.output)
    print(f"image: {args.output}")
    return 0


def cmd_class_images(args: argparse.Namespace) -> int:
    from sdlora import inference

    base = inference.choose_base(args.base, [])
    done = inference.make_class_images(
        lambda: _generation_pipeline(args, base), args.prompt, args.count, args.out, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
    )
    print(f"class images: {args.out} ({len(done.made)} made, {len(done.kept)} already there)")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from sdlora.hub.card import write_card

    print(f"card: {write_card(args.run_dir, repo_id=args.repo_id)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from sdlora import hub
    from sdlora.training.folder import RunFolder

    if args.dry_run:
        plan = hub.plan_upload(args.run_dir, args.repo_id)
        print(plan.describe())
        print(f"--- {RunFolder(args.run_dir).card.name} ---")
        print(plan.card_text)
        return 0
    print(f"pushed: {hub.push(args.run_dir, args.repo_id, private=args.private)}")
    return 0


def cmd_dataset_check(args: argparse.Namespace) -> int:
    import json

    from sdlora.config import load_config
    from sdlora.data import preflight
    from sdlora.models.native import check_dataset

    is_folder = args.target.is_dir()
    config = load_config(None if is_folder else args.target, [*([f"data.path={args.target}"] if is_folder else []),
                                                               *args.overrides])
    report = check_dataset(config, bare_folder=is_folder)
    print(json.dumps(report.to_json(), indent=2) if args.json else preflight.format_table(report))
    return 0 if report.usable else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlora.formats.to_lora import convert_file

    path, report = convert_file(args.input, args.output, args.to, args.dtype, args.rank, args.error, args.base,
                                progress=True)
    if report is not None:
        print(report.table())
    print(f"wrote: {path}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from sdlora.formats import DTYPES
    from sdlora.formats.resize import resize_file

    path, report = resize_file(args.input, args.output, args.rank, args.error, args.to,
                               DTYPES[args.dtype] if args.dtype else None, progress=True)
    print(report.table())
    print(f"wrote: {path}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from sdlora.formats import DTYPES
    from sdlora.formats.extract import extract_file

    path, report, notes = extract_file(args.base, args.tuned, args.output, args.rank, args.conv_rank, args.min_diff,
                                       args.clamp_quantile, args.to, DTYPES[args.dtype] if args.dtype else None,
                                       progress=True)
    print("\n".join([report.table(), *notes, f"wrote: {path}"]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from sdlora import formats

    print(json.dumps(formats.describe(args.file, full=args.full), indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sdlora import formats, inference
    from sdlora.inference import merge

    specs = [inference.AdapterSpec.parse(text) for text in args.adapters]
    if not args.into_base:
        formats.check_target(args.output, "-o")
    adapters = inference.read_adapters(specs)  # a damaged file fails before the base loads
    if args.into_base:
        from sdlora.models import load_base_model

        base = load_base_model(args.into_base)
        merge.bake_files_into(base, adapters, args.rank)
        print(f"base with the adapter baked in: {merge.save_base(base, args.output)}")
        return 0
    merged = merge.merge_files(adapters, args.rank)
    print(f"merged adapter: {formats.save_adapter(args.output, merged, args.to)}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from sdlora import inference
    from sdlora.inference import grid

    specs = [inference.AdapterSpec.parse(text) for text in args.lora]
    columns = grid.axis_from_text(args.x, args.x_values, "--x", len(specs))
    rows = grid.axis_from_text(args.y, args.y_values, "--y", len(specs)) if args.y else None
    prompt = grid.prompt_of_cells(args.prompt, columns, rows)
    adapters = inference.read_adapters(specs)  # a damaged file fails before the base loads
    pipe = _generation_pipeline(args, inference.choose_base(args.base, specs))
    stack = inference.stack_adapters(pipe, adapters)
    image = grid.render(pipe, stack, specs, columns, rows, prompt, args.seed, steps=args.steps,
                        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                        height=args.height, width=args.width, progress=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    print(f"grid: {args.output}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from sdlora.ui import serve

    serve(args.root or [Path.cwd()], args.runs, host=args.host, port=args.port, auth=args.auth)
    return 0


def _generation_pipeline(args: argparse.Namespace, base, progress: bool = False):
    from sdlora import inference
    from sdlora.hostmem import settle_host_memory
    from sdlora.models import load_base_model

    print(base.describe(), file=sys.stderr)  # stdout holds only the result lines scripts read
    device, dtype = inference.generation_device()
    pipe = inference.build_pipeline(load_base_model(base.source), scheduler=args.scheduler, device=device,
                                    dtype=dtype, progress=progress)
    if device.type == "cpu":
        settle_host_memory(retain=True)  # process-wide: CPU denoising steps stop page-faulting their memory back
    return pipe


def _generation_args(parser: argparse.ArgumentParser, prompt_help: str, prompt_required: bool = True,
                     adapters: bool = True) -> None:
    from sdlora.config import SampleSection

    if adapters:
        parser.add_argument("--base", help="base model: hub id, folder, .safetensors or sdlora:NAME (default: the "
                            "base the adapters record, else sdlora:tiny)")
        parser.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:W_TE]]",
                            help="adapter with weight (and text-encoder weight); repeat to stack")
    else:
        parser.add_argument("--base", required=True, help="base model: hub id, folder, .safetensors or "
                            "sdlora:NAME (the model the LoRA will be trained on)")
    parser.add_argument("--prompt", required=prompt_required, help=prompt_help)
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=SampleSection.model_fields["guidance_scale"].default,
                        help="classifier-free guidance (default: %(default)s, as a run's sample.guidance_scale; "
                        "the demo configs use 5.0 for the small sdlora:shapes base)")
    parser.add_argument("--scheduler", default=None,
                        help="ddim, euler, euler_a, dpm++ or ddpm; flow_euler for SD3 (default: ddim; SD3: flow_euler)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the base's own size)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the base's own size)")


def _rank_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--rank", type=int, help=f"{prefix}rank of every layer (with --error: the largest allowed)")
    parser.add_argument("--error", type=float, help=f"{prefix}per layer, the smallest rank whose relative Frobenius "
                        "error is at most this, e.g. 0.05")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train, stack and share Stable Diffusion LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {sdlora.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA from a config file")
    train.add_argument("config", type=Path, help="run config (.yaml or .toml)")
    train.add_argument("overrides", nargs="*", default=[],  # a default makes a `*` positional optional in argparse
                       help="optional section.field=value, e.g. train.steps=500 or 'sample.prompts=[a, b]'")
    train.add_argument("--resume", help="'latest' or a checkpoint folder (runs/x/checkpoints/step-000100)")
    train.add_argument("--overwrite", action="store_true", help="delete another run's checkpoints and adapter in "
                       "output.dir first (without it, such a folder is refused)")
    train.set_defaults(func=cmd_train)

    gen = commands.add_parser("generate", help="generate images with stacked adapters")
    _generation_args(gen, "the prompt; <lora:NAME:W> tags need --lora-dir")
    gen.add_argument("--num-images", type=int, default=1, help="images from consecutive seeds, saved as one row "
                     "(default: %(default)s)")
    gen.add_argument("--fuse", action="store_true", help="fuse adapters into the base weights (faster)")
    gen.add_argument("-o", "--output", type=Path, default=Path("sdlora.png"), help="image file (default: %(default)s)")
    gen.add_argument("--lora-dir", type=Path, help="folder that <lora:name:w> tags in the prompt are looked up in")
    gen.set_defaults(func=cmd_generate)

    images = commands.add_parser("class-images", help="make prior-preservation (regularization) images with the base "
                                 "itself, each captioned with the class prompt; run again to make only missing ones")
    _generation_args(images, "the class prompt, e.g. 'a photo of a dog' (also written as each image's caption)",
                     adapters=False)
    images.add_argument("--count", type=int, required=True, help="how many images (image i uses seed + i)")
    images.add_argument("--out", type=Path, required=True, help="folder; images already in it are kept")
    images.set_defaults(func=cmd_class_images)

    card = commands.add_parser("card", help="write the model card (README.md) of a run folder")
    card.add_argument("run_dir", type=Path, help="run folder (output.dir of a finished run)")
    card.add_argument("--repo-id", help="USER/NAME to put in the usage snippets")
    card.set_defaults(func=cmd_card)

    push = commands.add_parser("push", help="upload a run to the Hugging Face Hub in one commit")
    push.add_argument("run_dir", type=Path, help="run folder (output.dir of a finished run)")
    push.add_argument("repo_id", help="USER/NAME; created if it does not exist")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--dry-run", action="store_true", help="print the file list and the card; upload nothing")
    push.set_defaults(func=cmd_push)

    dataset = commands.add_parser("dataset", help="dataset tools").add_subparsers(dest="dataset_command", required=True)
    check = dataset.add_parser("check", help="decode every image and report what would and would not train")
    check.add_argument("target", type=Path, help="run config (.yaml / .toml) or an image folder")
    check.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.bucketing.enabled=true")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.set_defaults(func=cmd_dataset_check)

    convert = commands.add_parser("convert", help="convert an adapter between diffusers and kohya/A1111/ComfyUI, "
                                  "or into a plain LoRA (--to lora)")
    convert.add_argument("input", type=Path, help="adapter file (.safetensors), in either layout")
    convert.add_argument("output", type=Path, help="file to write")
    convert.add_argument("--to", choices=("kohya", "diffusers", "lora"), required=True,
                         help="layout of the output: kohya (A1111 / ComfyUI) or diffusers; lora: a plain LoRA in "
                         "diffusers layout, each layer's update re-factored by SVD (needs --rank or --error)")
    _rank_args(convert, "with --to lora: ")
    convert.add_argument("--base", help="with --to lora: the base the adapter was made for (needed for a DoRA)")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, help="tensor dtype of the output file (default: the input's)")
    convert.set_defaults(func=cmd_convert)

    resize = commands.add_parser("resize", help="a LoRA at a lower rank (or a target error) by SVD of each layer, "
                                 "with the error per layer and overall (kohya's resize_lora)")
    resize.add_argument("input", type=Path, help="LoRA file (.safetensors), in either layout")
    resize.add_argument("output", type=Path, help="file to write")
    _rank_args(resize, "")
    resize.add_argument("--to", choices=("kohya", "diffusers"), help="layout of the output (default: the input's)")
    resize.add_argument("--dtype", choices=DTYPE_NAMES, help="tensor dtype of the output file (default: the input's)")
    resize.set_defaults(func=cmd_resize)

    extract = commands.add_parser("extract", help="a LoRA from the difference of two checkpoints of the same "
                                  "architecture (kohya's extract_lora_from_models)")
    extract.add_argument("base", help="the original base: folder, .safetensors, hub id or sdlora:NAME")
    extract.add_argument("tuned", help="the fine-tuned checkpoint of the same architecture")
    extract.add_argument("output", type=Path, help="adapter file to write (.safetensors)")
    extract.add_argument("--rank", type=int, required=True, help="rank of the LoRA layers")
    extract.add_argument("--conv-rank", type=int, help="also extract the ResNet convolutions (LoCon), 3x3 ones at "
                         "this rank (default: attention and feed-forward layers only)")
    extract.add_argument("--min-diff", type=float, default=0.01, help="a text encoder is extracted only when one "
                         "of its weights moved by more than this (default: %(default)s, as kohya)")
    extract.add_argument("--clamp-quantile", type=float, help="clip the factors to this quantile of their values, "
                         "as kohya does with 0.99 (default: no clipping, the exact truncated SVD)")
    extract.add_argument("--to", choices=("diffusers", "kohya"), default="diffusers",
                         help="layout of the output (default: %(default)s)")
    extract.add_argument("--dtype", choices=DTYPE_NAMES, help="tensor dtype (default: fp32)")
    extract.set_defaults(func=cmd_extract)

    info = commands.add_parser("info", help="show an adapter's format, rank, alpha and metadata")
    info.add_argument("file", type=Path, help="adapter file (.safetensors) in any layout sdlora reads")
    info.add_argument("--full", action="store_true", help="print long metadata values whole (default: cut at "
                      "300 characters, saying how many were cut)")
    info.set_defaults(func=cmd_info)

    merge = commands.add_parser("merge", help="merge weighted adapters into one (or into a base model)")
    merge.add_argument("adapters", nargs="+", metavar="FILE:W", help="adapters with their weights")
    merge.add_argument("-o", "--output", type=Path, required=True, help="adapter file, or folder with --into-base")
    merge.add_argument("--rank", type=int, help="re-rank the merge to this rank by truncated SVD (default: exact)")
    merge.add_argument("--to", choices=("diffusers", "kohya"), default="diffusers",
                       help="layout of the merged adapter (default: %(default)s)")
    merge.add_argument("--into-base", metavar="BASE",
                       help="bake into this base: -o FOLDER writes diffusers layout, -o FILE.safetensors one "
                       "A1111 / ComfyUI single file (SD1.x bases)")
    merge.set_defaults(func=cmd_merge)

    grid = commands.add_parser("grid", help="labelled grid over adapter weights, prompts or seeds")
    _generation_args(grid, "prompt of every cell; optional when an axis is prompt", prompt_required=False)
    grid.add_argument("--x", default="weight:0",
                      help="column axis: weight:N (adapter N), prompt or seed (default: %(default)s)")
    grid.add_argument("--x-values", required=True, help="0,0.5,1 or 0:1:0.25; prompts split at |")
    grid.add_argument("--y", help="row axis (optional), as --x")
    grid.add_argument("--y-values", default="", help="values of the row axis, as --x-values")
    grid.add_argument("-o", "--output", type=Path, default=Path("grid.png"), help="image file (default: %(default)s)")
    grid.set_defaults(func=cmd_grid)

    ui = commands.add_parser("ui", help="the local web UI: dataset, training, generation, sharing")
    ui.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; any other needs "
                    "--auth)")
    ui.add_argument("--root", type=Path, action="append", help="a folder the page may open (repeat; default: the "
                    "current folder)")
    ui.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the UI's runs (default: %(default)s)")
    ui.add_argument("--auth", help="USER:PASSWORD required by the page (or set SDLORA_UI_AUTH)")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from sdlora import quiet_missing_torchvision

    quiet_missing_torchvision()  # process-wide: one transformers message about a backend sdlora never uses
    # Errors a user can fix (bad config, missing folder, unreadable file) end with one clear line, no traceback.
    from sdlora.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        # One line per problem (a config file with two bad fields gives two), each greppable on its own.
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"sdlora: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from sdlora.training.interrupt import EXIT_ABORTED

        print("sdlora: interrupted; no checkpoint was written for the unfinished step", file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())

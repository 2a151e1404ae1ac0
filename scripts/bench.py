"""Benchmark sdlora's LoRA training (or generation) on SD1.5-shaped models with random weights.

Training runs through the same `TrainingRun.build` + `train.fit` that `sdlora train` uses; only the base model is
built from diffusers' / transformers' config classes instead of loaded (the shapes, not the values, set the cost).

    python scripts/bench.py                                   # SD1.5, 512 px, batch 1, rank 4, fp32
    python scripts/bench.py --cached                          # latents + text states cached, encoders freed
    python scripts/bench.py --cached --checkpointing --weight-storage bf16
    python scripts/bench.py --cached --quantize int8          # QLoRA: int8 weight-only frozen base (optimum-quanto)
    python scripts/bench.py --generate                        # base vs 2 stacked adapters, unfused vs fused, in rounds
    python scripts/bench.py --arch tiny --resolution 64 --steps 2 --warmup 1    # smoke test in seconds
    python scripts/bench.py --arch sd3.5-medium --resolution 1024 --rank 16 --precision bf16 --checkpointing \
        --cached --optimizer adamw8bit --quantize nf4                    # SD3.5 Medium QLoRA (CUDA)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sdlora.bench.benchmark import (  # noqa: E402
    TrainBenchOptions,
    run_generation_bench,
    run_training_bench,
)

TRAIN_ROWS = [
    ("device", "device", "{}"), ("precision", "precision_used", "{}"),
    ("step time, median", "step_median_s", "{:.3f} s"), ("step time, min", "step_min_s", "{:.3f} s"),
    ("step time, max", "step_max_s", "{:.3f} s"), ("images/s", "images_per_s", "{:.3f}"),
    ("time to first step", "time_to_first_step_s", "{:.1f} s"), ("  of which build", "build_s", "{:.1f} s"),
    ("  first step itself", "first_step_s", "{:.2f} s"),
    ("peak RSS, timed steps", "peak_rss_steps_gb", "{:.2f} GiB"),
    ("peak RSS, whole process", "peak_rss_process_gb", "{:.2f} GiB"),
    ("page faults per step", "page_faults_per_step", "{:,.0f}"),
    ("system time per step", "system_s_per_step", "{:.2f} s"),
    ("peak CUDA memory, allocated", "peak_cuda_gb", "{:.2f} GiB"),
    ("peak CUDA memory, reserved", "peak_cuda_reserved_gb", "{:.2f} GiB"),
    ("peak device memory used (driver)", "peak_device_used_gb", "{:.2f} GiB"),
    ("frozen UNet / transformer weights", "frozen_unet_gb", "{:.3f} GiB"),
    ("trainable LoRA params", "trainable_params", "{:,}"), ("FLOPs per step", "tflop_per_step", "{:.4g} TFLOP"),
    ("fp32 matmul rate", "matmul_gflops", "{:.1f} GFLOP/s"),
    ("achieved / matmul rate", "achieved_fraction", "{:.1%}"), ("losses finite", "losses_finite", "{}"),
    ("LoRA weights finite", "params_finite", "{}"),
    ("freed after caching", "freed_after_caching", "{}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="--cached sets data.cache_latents and data.cache_text_embeddings: the run encodes the bench images "
        "and captions once into a cache (counted in time to first step), frees the VAE and text encoder, and trains "
        "from the cache, exactly as `sdlora train` does with those options.",
    )
    parser.add_argument("--arch", default="sd15",
                        choices=["sd15", "sdxl", "sd3-medium", "sd3.5-medium", "sd3.5-large", "tiny", "tiny-sdxl",
                                 "tiny-sd3"],
                        help="sd15 (default), sdxl and the SD3 family (use --resolution 1024), tiny / tiny-sdxl / "
                        "tiny-sd3 (smoke tests)")
    parser.add_argument("--no-t5", action="store_true",
                        help="SD3 archs: no T5-XXL text encoder (model.t5=false; 4.7 B parameters never built)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16", "auto"],
                        help="train.mixed_precision; with --generate, the pipeline's dtype")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing in the UNet or transformer")
    parser.add_argument("--weight-storage", default="compute", choices=["compute", "bf16", "fp8"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (first step compiles)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--host-memory", default="auto", choices=["auto", "always", "never"],
                        help="train.retain_host_memory: keep freed CPU memory in the process (always), let glibc "
                        "return it (never), or auto (keep it unless a memory saver is on)")
    parser.add_argument("--cached", action="store_true", help="train from cached latents and text states (see below)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median and spread reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted step")
    parser.add_argument("--generate", action="store_true", help="time generation instead of training")
    parser.add_argument("--gen-steps", type=int, default=20, help="denoising steps per image with --generate")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds with --generate (one image per setting each)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--sd3-shapes", choices=["sd3-medium", "sd3.5-medium", "sd3.5-large"],
                        help="print an SD3 / SD3.5 base's parameter counts per part (built on the meta device, "
                        "no memory used; with a LoRA of --rank on the default targets) and exit")
    args = parser.parse_args(argv)
    from sdlora.bench.archs import SD3_TRAIN_ARCHS

    if args.generate and args.arch in SD3_TRAIN_ARCHS:
        parser.error(f"--generate times UNet pipelines; --arch {args.arch} is measured in training only")
    if args.no_t5 and args.arch not in SD3_TRAIN_ARCHS:
        parser.error(f"--no-t5: only the SD3 archs have a T5 encoder, not --arch {args.arch}")
    return args


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.sd3_shapes:
        from sdlora.bench.archs import sd3_shapes

        result = sd3_shapes(args.sd3_shapes, args.rank)
        rows = [(name, f"{count:,}") for name, count in result.items()]
    elif args.generate:
        from sdlora.models.precision import resolve_mixed_precision

        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            resolve_mixed_precision(args.precision)]
        result = run_generation_bench(args.arch, args.resolution, args.gen_steps, args.repeats, args.rank, dtype)
        rows = [(f"{name} (median, min-max)", "{:.2f} s ({:.2f}-{:.2f})".format(
            result[f"{name}_median_s"], result[f"{name}_min_s"], result[f"{name}_max_s"]))
            for name in ("base", "stacked_unfused", "stacked_fused")]
        rows += [(f"{name} / base, same round (median, min-max; 95% interval)",
                  "{:.3f} ({:.3f}-{:.3f}; {:.3f}-{:.3f})".format(
                      result[f"{name}_over_base"], result[f"{name}_over_base_min"], result[f"{name}_over_base_max"],
                      *result[f"{name}_over_base_ci95"]))
                 for name in ("unfused", "fused")]
        rows += [("dtype", result["dtype"]), ("black images", str(result["black_images"])),
                 ("peak CUDA memory, allocated", "-" if result["peak_cuda_gb"] is None
                  else "{:.2f} GiB".format(result["peak_cuda_gb"]))]
    else:
        options = TrainBenchOptions(
            arch=args.arch, resolution=args.resolution, batch=args.batch, rank=args.rank, precision=args.precision,
            checkpointing=args.checkpointing, weight_storage=args.weight_storage, quantize=args.quantize,
            channels_last=args.channels_last, compile=args.compile, optimizer=args.optimizer, cached=args.cached,
            host_memory=args.host_memory, t5=not args.no_t5,
            steps=args.steps, warmup=args.warmup, flops=not args.no_flops,
        )
        result = run_training_bench(options)
        rows = [(name, "-" if result[key] is None else fmt.format(result[key])) for name, key, fmt in TRAIN_ROWS]
    if args.json:
        print(json.dumps(result))
    else:
        print_table([("command", "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv))]
                    + rows)
    return 0


def run_main(argv=None) -> int:
    """main(), with bad input (a CUDA-only lever on a CPU, a wrong option) as one line and exit status 2, as the
    sdlora CLI reports it: gpu_check.sh's dry run on a CPU records that line as the row's failure."""
    from sdlora.errors import UserError

    try:
        return main(argv)
    except UserError as exc:
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run_main())

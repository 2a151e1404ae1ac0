"""Measure training and generation speed and memory through sdlora's real code paths (used by scripts/bench.py).

Training goes through `TrainingRun.build` and `train.fit`, exactly what `sdlora train` runs; only the base model is
handed in prebuilt (random weights of the real shapes, see `archs`) instead of loaded from disk. Numbers reported:
median step time with its spread, images/s, time to first step, peak RSS (whole process, and during the timed
steps alone), peak CUDA memory, FLOPs per step (torch's FlopCounterMode) and the fraction of this machine's fp32
matmul rate, measured in the same process.
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sdlora import inference
from sdlora.bench import archs
from sdlora.config import load_config
from sdlora.hostmem import settle_host_memory
from sdlora.models import lora
from sdlora.models.quantize import frozen_weight_bytes
from sdlora.training import loop
from sdlora.training.run import TrainingRun

GB = 1024**3


@dataclass(frozen=True)
class TrainBenchOptions:
    arch: str = "sd15"
    resolution: int = 512
    batch: int = 1
    rank: int = 4
    precision: str = "no"
    checkpointing: bool = False
    weight_storage: str = "compute"
    quantize: str = "none"
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "adamw"
    host_memory: str = "auto"
    cached: bool = False
    t5: bool = True  # SD3 archs: build T5-XXL (model.t5); False trains with zeros in its place
    steps: int = 3
    warmup: int = 1
    flops: bool = True

    def overrides(self, data: Path, out: Path) -> list[str]:
        """The `sdlora train` config these options mean (the bench runs exactly that config)."""
        return [
            f"model.base=random:{self.arch}", f"model.quantize={self.quantize}", f"data.path={data}",
            f"data.resolution={self.resolution}", f"lora.rank={self.rank}",
            f"train.steps={self.warmup + int(self.flops) + self.steps}", f"train.batch_size={self.batch}",
            f"train.mixed_precision={self.precision}", f"train.gradient_checkpointing={self.checkpointing}",
            f"train.weight_storage={self.weight_storage}", f"train.channels_last={self.channels_last}",
            f"train.compile={self.compile}", f"train.optimizer={self.optimizer}", f"output.dir={out}",
            f"train.retain_host_memory={self.host_memory}",
            f"data.cache_latents={self.cached}", f"data.cache_text_embeddings={self.cached}",
            f"model.t5={self.t5}",
        ]


class StepClock:
    """Loop hooks that timestamp every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []

    def after_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> None:
        _synchronize()
        self.times.append(time.perf_counter())
        self.losses.append(loss)

    def should_stop(self) -> bool:
        return False


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class DeviceMemorySampler:
    """The driver's view of GPU memory: device memory in use (total - free, as nvidia-smi shows it, CUDA context and
    the caching allocator's reserve included), sampled every few milliseconds in a thread; `peak_gb` is the highest
    reading. It counts every process on the GPU, so it reads one process's need only on an otherwise idle card."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        free, total = torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> DeviceMemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_gb(self) -> float:
        return self.peak / GB


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM). False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def window_peak_rss_gb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def matmul_rate(device: torch.device, seconds: float = 2.0) -> float:
    """Best fp32 matmul rate in FLOP/s on `device`: the ceiling a step's achieved rate is compared with."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    _synchronize()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def write_bench_images(folder: Path, resolution: int, count: int = 2) -> Path:
    """A few noise images with captions: the dataset a non-cached run decodes and encodes each step."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        pixels = bytes(rng.getrandbits(8) for _ in range(resolution * resolution * 3))
        Image.frombytes("RGB", (resolution, resolution), pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of a cat, in the style", encoding="utf-8")
    return folder


def run_training_bench(options: TrainBenchOptions, workdir: Path | None = None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdlora-bench-")))
        started = time.perf_counter()
        data = write_bench_images(workdir / "data", options.resolution, count=max(2, options.batch))  # one batch
        config = load_config(None, options.overrides(data, workdir / "run"))
        # Built in the dtype `sdlora train` would load this config's base in (bf16 for smaller weight storage).
        # On a GPU the random weights are drawn there (seconds instead of minutes) and moved to the CPU, where a
        # loaded checkpoint would arrive; the run then places them exactly as `sdlora train` does.
        init_device = "cuda" if torch.cuda.is_available() else None

        def random_base(dtype):
            base = archs.build_random_base(options.arch, frozen_dtype=dtype, init_device=init_device,
                                           use_t5=options.t5)
            if init_device:  # drawing on the GPU is the bench's shortcut, not a load: keep it out of the setup peak
                torch.cuda.reset_peak_memory_stats()
            return base

        run = TrainingRun(config, base=random_base)
        run.build()  # with --cached this also fills the cache and frees the VAE and text encoder, as in a run
        built = time.perf_counter()
        setup_peak = window_peak_rss_gb()  # read before the reset below: building and caching count too
        batches = iter(run.data_loader(0))
        clock = StepClock()
        fit_started = time.perf_counter()
        loop.fit(run.parts, batches, 0, options.warmup, clock)
        step = options.warmup
        flops = None
        if options.flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                loop.fit(run.parts, batches, step, step + 1, clock)
            flops, step = counter.get_total_flops(), step + 1
        device = run.accelerator.device
        cuda = device.type == "cuda"
        # Placing and quantizing the base, caching (text encoders and VAE on the device, then freed) and the warm-up
        # steps: what a card must hold before the steady state the timed steps measure.
        setup_peak_cuda = torch.cuda.max_memory_allocated() / GB if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        window = reset_peak_rss()
        sampler = DeviceMemorySampler() if cuda else contextlib.nullcontext()
        timed_from = time.perf_counter()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        n_before = len(clock.times)
        with sampler:
            loop.fit(run.parts, batches, step, step + options.steps, clock)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stamps = [timed_from, *clock.times[n_before:]]
        durations = [b - a for a, b in zip(stamps, stamps[1:])]
        median = statistics.median(durations)
        # Read before matmul_rate, whose large matrices would otherwise count as the training steps' peak.
        steps_peak = window_peak_rss_gb() if window else None
        rate = matmul_rate(device) if flops is not None else None  # only the FLOP count is compared with it
        result = {
            **asdict(options),
            "device": str(device),
            "precision_used": run.accelerator.mixed_precision,
            "step_median_s": median,
            "step_min_s": min(durations),
            "step_max_s": max(durations),
            "images_per_s": options.batch / median,
            "build_s": built - started,
            "first_step_s": clock.times[0] - fit_started if clock.times else None,
            "time_to_first_step_s": clock.times[0] - started if clock.times else None,
            "peak_rss_steps_gb": steps_peak,
            # ru_maxrss is updated lazily by the kernel and can trail VmHWM; the process peak includes the window's.
            "peak_rss_process_gb": max(peak_rss_gb(), steps_peak or 0.0, setup_peak or 0.0),
            # Pages the kernel had to hand back to the process, and the kernel time that cost, per timed step.
            "page_faults_per_step": (usage.ru_minflt - usage_before.ru_minflt) / options.steps,
            "system_s_per_step": (usage.ru_stime - usage_before.ru_stime) / options.steps,
            # During the timed steps: what tensors held (allocated), what torch's caching allocator took from the
            # driver (reserved), and the device memory in use as the driver counts it (context included, sampled).
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / GB if cuda else None,
            "setup_peak_cuda_gb": setup_peak_cuda,
            "peak_cuda_reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else None,
            "peak_device_used_gb": sampler.peak_gb if cuda else None,
            "frozen_unet_gb": frozen_weight_bytes(run.base.unet) / GB,
            "trainable_params": sum(p.numel() for p in run.parts.params),
            "tflop_per_step": flops / 1e12 if flops is not None else None,
            "matmul_gflops": rate / 1e9 if rate is not None else None,
            "achieved_fraction": (flops / median) / rate if flops is not None else None,
            "losses_finite": all(math.isfinite(loss) for loss in clock.losses),
            "params_finite": all(bool(torch.isfinite(p).all()) for p in run.parts.params),
            "freed_after_caching": ", ".join(sorted(run.released)) or None,
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# Generation: base vs two stacked adapters, unfused and fused


def random_adapter(unet: torch.nn.Module, rank: int, seed: int):
    """A LoRA file's worth of random tensors on the attention projections, as formats would read it from disk."""
    from sdlora import formats
    from sdlora.config import UNET_ATTENTION_TARGETS

    shape = lora.AdapterShape(rank, float(rank), UNET_ATTENTION_TARGETS)
    lora.attach(unet, shape, adapter_name="_bench")
    tensors = lora.lora_state_dict(unet, "_bench")
    lora.delete_adapter(unet, "_bench")
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in tensors.items()}
    return formats.AdapterFile(tensors={"unet": tensors}, shapes={"unet": formats.shape_from_tensors(tensors, rank)})


@contextlib.contextmanager
def _base_modules(model: torch.nn.Module):
    """The model as it was before any adapter: LoRA wrappers out, the original modules and weights back in place."""
    unwrapped = lora.unwrap(model)
    try:
        yield
    finally:
        lora.rewrap(unwrapped)


def _time_image(pipe, resolution: int, steps: int, seed: int, black: list[int] | None = None) -> float:
    start = time.perf_counter()
    images = inference.generate(pipe, "a photo of a cat", seed=seed, steps=steps, guidance_scale=7.5,
                                height=resolution, width=resolution)
    _synchronize()
    elapsed = time.perf_counter() - start
    if black is not None:  # a NaN or overflowed decode comes out as an all-black image
        black.extend(1 for image in images if image.getextrema() == ((0, 0), (0, 0), (0, 0)))
    return elapsed


GENERATION_SETTINGS = ("base", "stacked_unfused", "stacked_fused")


def median_interval(values: list[float], confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median: how far the reported median could move on a rerun of as many
    rounds on an equally noisy machine. Seeded, so the same timings always give the same interval."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * (resamples - 1))], medians[round((1 - tail) * (resamples - 1))]


def run_generation_bench(arch: str = "sd15", resolution: int = 512, steps: int = 20, repeats: int = 3,
                         rank: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Base, two stacked adapters unfused, and the same fused, timed in rounds: each round makes one image per
    setting, in an order that rotates from round to round, so a machine that drifts during the run biases no setting.
    The ratios are taken within a round (fused / base of the same round) and their median reported, with a bootstrap
    95 % interval: a shared machine's slow minute then cancels instead of landing on one setting, and the interval
    says whether the rounds were enough to tell a few percent apart.

    All three settings run on one pipeline, so they read the same tensors at the same addresses: the base setting
    takes the adapters' wrappers out (the model's own modules and weights, untouched); fused merges the adapters
    into those weights and takes the wrappers out too. Fusing happens between images, untimed, exactly as
    `sdlora generate --fuse` does it once before its images. `dtype`: the pipeline's weights (fp16 or bf16 on GPUs).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_device = "cuda" if device.type == "cuda" else None
    # Built in fp32 and cast by build_pipeline, as `build_pipeline(load_base_model(...), device, dtype)` does.
    pipe = inference.build_pipeline(archs.build_random_base(arch, init_device=init_device), device=device,
                                    dtype=dtype)
    if device.type == "cpu":
        settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
    stack = inference.AdapterStack(pipe)
    for number in range(2):
        stack.add(f"a{number}", random_adapter(pipe.unet, rank, seed=number))
    stack.set_weights({"a0": (0.8, 0.8), "a1": (0.5, 0.5)})

    black: list[int] = []

    def one_image(setting: str, seed: int) -> float:
        if setting == "stacked_unfused":
            return _time_image(pipe, resolution, steps, seed, black)
        if setting == "base":
            with _base_modules(pipe.unet):
                return _time_image(pipe, resolution, steps, seed, black)
        stack.fuse()
        try:
            return _time_image(pipe, resolution, steps, seed, black)
        finally:
            stack.unfuse()

    for setting in GENERATION_SETTINGS:  # warm-up: first calls allocate and pick kernels
        one_image(setting, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings: dict[str, list[float]] = {setting: [] for setting in GENERATION_SETTINGS}
    for round_index in range(repeats):
        shift = round_index % len(GENERATION_SETTINGS)
        for setting in GENERATION_SETTINGS[shift:] + GENERATION_SETTINGS[:shift]:
            timings[setting].append(one_image(setting, seed=round_index + 1))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    ratios = {
        f"{name.removeprefix('stacked_')}_over_base": [a / b for a, b in zip(timings[name], timings["base"])]
        for name in GENERATION_SETTINGS[1:]
    }
    return {
        "arch": arch, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "resolution": resolution,
        "steps": steps, "repeats": repeats, "black_images": len(black),
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None,
        **{f"{name}_median_s": value for name, value in medians.items()},
        **{f"{name}_min_s": min(values) for name, values in timings.items()},
        **{f"{name}_max_s": max(values) for name, values in timings.items()},
        **{name: statistics.median(values) for name, values in ratios.items()},
        **{f"{name}_min": min(values) for name, values in ratios.items()},
        **{f"{name}_max": max(values) for name, values in ratios.items()},
        **{f"{name}_ci95": median_interval(values) for name, values in ratios.items()},
        "seconds_per_image": timings,  # every timed image, in round order, for tools reading --json
    }

"""scripts/bench.py's engine: it measures the real training path, the published shapes, and generation in rounds."""

from __future__ import annotations

import torch

from sdlora import inference
from sdlora.models import lora


def test_bench_measures_the_real_training_path(tmp_path):
    """scripts/bench.py's engine on the tiny layout: every number present and sane (timings are not asserted)."""
    from sdlora.bench.benchmark import TrainBenchOptions, run_training_bench

    result = run_training_bench(
        TrainBenchOptions(arch="tiny", resolution=64, steps=2, warmup=1, cached=True, checkpointing=True,
                          weight_storage="bf16"),
        workdir=tmp_path,
    )
    assert result["losses_finite"] and result["precision_used"] == "no"
    assert 0 < result["step_min_s"] <= result["step_median_s"] <= result["step_max_s"]
    assert result["tflop_per_step"] > 0 and result["matmul_gflops"] > 0
    assert result["peak_rss_process_gb"] >= result["peak_rss_steps_gb"] > 0
    assert result["trainable_params"] > 0 and result["frozen_unet_gb"] > 0
    assert result["freed_after_caching"] == "text_encoder, vae, vae.encoder"  # the real cache path ran


def test_bench_arch_shapes_match_the_published_models():
    """The random bases have the real models' parameter counts (built on the meta device: no memory used)."""
    from diffusers import UNet2DConditionModel

    from sdlora.bench import archs

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**archs.SD15_UNET)
        sdxl = UNet2DConditionModel(**archs.SDXL_UNET)
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684


def test_bench_runs_sdxl_shapes_through_the_sdxl_loop(tmp_path):
    from sdlora.bench.benchmark import TrainBenchOptions, run_training_bench

    result = run_training_bench(
        TrainBenchOptions(arch="tiny-sdxl", resolution=64, steps=1, warmup=1, cached=True, flops=False),
        workdir=tmp_path,
    )
    assert result["losses_finite"] and result["trainable_params"] > 0
    # Both text encoders and the VAE leave memory once the cache holds states and pooled embeddings.
    assert result["freed_after_caching"] == "text_encoder, text_encoder_2, vae, vae.encoder"


def test_generation_bench_times_every_setting_in_rotating_rounds():
    from sdlora.bench.benchmark import run_generation_bench

    result = run_generation_bench("tiny", resolution=64, steps=2, repeats=3)
    for name in ("base", "stacked_unfused", "stacked_fused"):
        assert 0 < result[f"{name}_min_s"] <= result[f"{name}_median_s"] <= result[f"{name}_max_s"]
    for ratio in ("unfused_over_base", "fused_over_base"):
        assert 0 < result[f"{ratio}_min"] <= result[ratio] <= result[f"{ratio}_max"]
        low, high = result[f"{ratio}_ci95"]
        assert result[f"{ratio}_min"] <= low <= high <= result[f"{ratio}_max"]


def test_median_interval_narrows_with_rounds_and_is_reproducible():
    from sdlora.bench.benchmark import median_interval

    noisy = [1.0 + 0.1 * ((7 * i) % 11 - 5) / 5 for i in range(11)]  # 0.9 .. 1.1, median 1.0
    low, high = median_interval(noisy)
    assert low < 1.0 < high and 0.9 <= low and high <= 1.1
    assert median_interval(noisy) == (low, high)
    wide = median_interval(noisy[:3])
    assert wide[1] - wide[0] > high - low
    assert median_interval([1.02] * 5) == (1.02, 1.02)


def test_generation_bench_base_setting_is_the_model_before_adapters():
    """The bench's base setting runs the stacked pipeline's UNet with the wrappers taken out: same output as before
    any adapter was added, and the adapters are back afterwards."""
    from sdlora.bench import archs
    from sdlora.bench.benchmark import _base_modules, random_adapter

    unet = archs.build_random_base("tiny").unet.eval()
    sample = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(*sample).sample
        stack = inference.AdapterStack(type("Pipe", (), {"unet": unet})())
        stack.add("a0", random_adapter(unet, 4, seed=0))
        stack.set_weights({"a0": (1.0, 1.0)})
        stacked = unet(*sample).sample
        with _base_modules(unet):
            assert lora.lora_layers(unet) == []
            assert torch.equal(unet(*sample).sample, before)
        assert torch.equal(unet(*sample).sample, stacked) and not torch.equal(stacked, before)

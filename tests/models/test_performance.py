"""Performance levers: hardware-chosen precision, small frozen-weight storage, QLoRA, cached inputs, loader options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

from sdlora import inference
from sdlora.config import ConfigError
from sdlora.formats import read_adapter
from sdlora.models import backends, load_base_model, lora, precision
from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun

# -- mixed_precision: auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        (precision.Hardware(cuda=True, cuda_bf16=True), "bf16"),
        (precision.Hardware(cuda=True, cuda_bf16=False), "fp16"),
        (precision.Hardware(cuda=False, cpu_native_bf16=True), "bf16"),
        (precision.Hardware(cuda=False, cpu_native_bf16=False), "no"),
    ],
)
def test_auto_precision_follows_the_hardware(hardware, expected):
    assert precision.choose_mixed_precision("auto", hardware) == expected
    # An explicit setting is never second-guessed.
    assert precision.choose_mixed_precision("no", hardware) == "no"


def test_auto_on_an_avx2_cpu_trains_in_fp32(make_config, monkeypatch):
    monkeypatch.setattr(precision, "detect_hardware", lambda: precision.Hardware(cuda=False, cpu_native_bf16=False))
    run = TrainingRun(make_config("train.mixed_precision=auto"))
    assert run.accelerator.mixed_precision == "no" and run.weight_dtype == torch.float32


def test_bare_yaml_no_means_fp32(make_config):
    assert make_config("train.mixed_precision=no").train.mixed_precision == "no"


# -- frozen weights stored smaller than they compute ---------------------------------------------------------------


def _tiny_unet_with_lora():
    from sdlora.models.tiny import build_tiny_components

    unet = build_tiny_components()["unet"].requires_grad_(False)
    lora.attach(unet, lora.AdapterShape(4, 4.0, ("to_q", "to_k", "to_v", "to_out.0")))
    torch.manual_seed(0)
    for param in lora.trainable_parameters(unet):
        param.data.normal_(0, 0.1)  # non-zero B, so LoRA gradients depend on every frozen layer after it
    return unet


def _output_and_lora_grads(unet):
    torch.manual_seed(1)
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 32, 32)
    for param in lora.trainable_parameters(unet):
        param.grad = None
    out = unet(x, t, states).sample
    out.pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in lora.trainable_parameters(unet)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stored_weights_compute_exactly_like_their_upcast_values(checkpointing):
    """bf16 storage == fp32 weights holding the same (rounded) values: same output and LoRA gradients, bit for bit,
    with gradient checkpointing too (where diffusers' layerwise casting fails its recomputation check)."""
    unet = _tiny_unet_with_lora()
    stored = copy.deepcopy(unet)
    converted = precision.store_frozen_weights(stored, "bf16")
    assert converted > 50
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for (name, ref), (name2, small) in zip(reference.named_parameters(), stored.named_parameters()):
            assert name == name2
            ref.copy_(small.float())
    if checkpointing:
        stored.enable_gradient_checkpointing()
        stored.train()
    out_ref, grads_ref = _output_and_lora_grads(reference)
    out, grads = _output_and_lora_grads(stored)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    # Placing the model in the compute dtype afterwards keeps the stored weights small.
    stored.to(torch.float32)
    assert stored.conv_in.weight.dtype == torch.bfloat16 and stored.conv_in.bias.dtype == torch.float32


@pytest.mark.parametrize(("storage", "dtype"), [("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)])
def test_training_with_small_frozen_weights(make_config, tiny_base, storage, dtype, monkeypatch):
    import sdlora.training.run

    loaded_with = {}
    load = sdlora.training.run.load_base_model

    def recording_load(*args, **kwargs):
        loaded_with.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(sdlora.training.run, "load_base_model", recording_load)
    run = TrainingRun(make_config(f"train.weight_storage={storage}", "train.gradient_checkpointing=true",
                                  "lora.rank=4"))
    run.build()
    # The frozen UNet and text encoder load in bf16, so their fp32 copies never exist; the VAE stays fp32.
    assert loaded_with["frozen_dtype"] == torch.bfloat16
    assert run.base.vae.dtype == torch.float32 and run.base.unet.conv_norm_out.weight.dtype == torch.float32
    result = run.fit()
    assert all(math.isfinite(loss) for loss in result.losses)
    named = dict(run.base.unet.named_parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in named.items() if "lora_" in n)
    assert named["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight"].dtype == dtype
    assert named["down_blocks.0.resnets.0.conv1.weight"].dtype == dtype
    _assert_loads_on_full_precision_base(result.adapter_path, tiny_base, run)


def _assert_loads_on_full_precision_base(adapter_path, tiny_base, run):
    adapter = read_adapter(adapter_path)
    assert set(adapter.tensors["unet"]) == set(lora.lora_state_dict(run.base.unet))
    pipe = inference.build_pipeline(load_base_model(str(tiny_base)))
    assert pipe.unet.dtype == torch.float32
    base_image = inference.generate(pipe, "a red circle", seed=0, steps=3, height=64, width=64)[0]
    inference.stack_adapters(pipe, [inference.AdapterSpec(str(adapter_path), 1.0)])
    image = inference.generate(pipe, "a red circle", seed=0, steps=3, height=64, width=64)[0]
    assert image.size == (64, 64)
    assert image.tobytes() != base_image.tobytes(), "the adapter changed nothing on the full-precision base"


def test_quantize_and_weight_storage_together_are_refused(make_config):
    with pytest.raises(ConfigError, match="model.quantize.*train.weight_storage"):
        make_config("model.quantize=int8", "train.weight_storage=bf16")


# -- QLoRA --------------------------------------------------------------------------------------------------------


def _eval_loss(run, batch) -> float:
    saved = run.parts.generator.get_state()
    run.parts.generator.manual_seed(1234)
    with torch.no_grad():
        loss = train_loop.micro_step_loss(run.parts, batch).item()
    run.parts.generator.set_state(saved)
    return loss


@pytest.mark.skipif(not backends.quanto_available(), reason="needs optimum-quanto (pip install sdlora[quant])")
def test_int8_qlora_trains_and_its_adapter_loads_on_the_full_precision_base(make_config, tiny_base):
    from optimum.quanto import QConv2d, QLinear

    from sdlora.data import collate

    run = TrainingRun(make_config("model.quantize=int8", "train.steps=40", "train.batch_size=4",
                                  "train.learning_rate=5e-3", "lora.rank=8"))
    run.build()
    unet = run.base.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q.base_layer, QLinear) and isinstance(unet.conv_in, QConv2d)
    assert not any(p.requires_grad for n, p in run.base.text_encoder.named_parameters())
    assert all(p.dtype == torch.float32 for p in run.parts.params)
    batch = collate([run.dataset[(0, i)] for i in range(4)])
    run.parts.unet.eval()
    before = _eval_loss(run, batch)
    result = run.fit()
    run.parts.unet.eval()
    after = _eval_loss(run, batch)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert after < 0.9 * before, (before, after)
    _assert_loads_on_full_precision_base(result.adapter_path, tiny_base, run)


def test_nf4_without_cuda_says_what_to_do(make_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = TrainingRun(make_config("model.quantize=nf4"))
    with pytest.raises(RuntimeError, match="nf4 needs a CUDA GPU and bitsandbytes.*int8"):
        run.build()


def test_int8_without_quanto_says_what_to_install(make_config, monkeypatch):
    monkeypatch.setattr(backends, "quanto_available", lambda: False)
    run = TrainingRun(make_config("model.quantize=int8"))
    with pytest.raises(RuntimeError, match=r"optimum-quanto: `pip install sdlora\[quant\]`"):
        run.build()


# -- only the UNet step with cached inputs ------------------------------------------------------------------------


def test_cached_batches_run_no_vae_or_text_encoder_forward(make_config):
    run = TrainingRun(make_config())
    run.build()
    calls = {"vae": 0, "text_encoder": 0}
    for name, module in (("vae", run.base.vae), ("text_encoder", run.base.text_encoder)):
        for sub in module.modules():
            sub.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))

    class Quiet:
        def after_step(self, step, loss, lr):
            pass

        def should_stop(self):
            return False

    generator = torch.Generator().manual_seed(0)
    cached = [{"latents": torch.randn(2, 4, 8, 8, generator=generator),
               "encoder_hidden_states": torch.randn(2, 32, 32, generator=generator)} for _ in range(3)]
    losses = train_loop.fit(run.parts, iter(cached), 0, 3, Quiet())
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert calls == {"vae": 0, "text_encoder": 0}
    # The hooks do count: one step on decoded images runs both encoders.
    train_loop.fit(run.parts, iter(run.data_loader(0)), 3, 4, Quiet())
    assert calls["vae"] > 0 and calls["text_encoder"] > 0


def test_a_cached_run_frees_the_encoders_and_still_trains(make_config, tmp_path):
    """Issue 8: with latents and text cached, the VAE and the frozen text encoder leave memory after caching."""
    run = TrainingRun(make_config("data.cache_latents=true", "data.cache_text_embeddings=true", "train.steps=3",
                                  f"data.cache_dir={tmp_path / 'cache'}"))
    run.build()
    assert run.released == {"vae.encoder": "released", "vae": "meta", "text_encoder": "meta"}
    assert all(p.is_meta for p in [*run.base.vae.parameters(), *run.base.text_encoder.parameters()])
    assert next(run.base.unet.parameters()).device.type == "cpu"
    result = run.fit()
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert result.adapter_path.is_file()
    # Anything that still reached a freed part would fail loudly rather than silently cost time.
    with pytest.raises(RuntimeError, match="vae.encoder was released after caching"):
        run.base.vae.encoder(torch.zeros(1, 3, 8, 8))


def test_a_cached_run_with_samples_keeps_what_samples_need(make_config, tmp_path):
    run = TrainingRun(make_config("data.cache_latents=true", "data.cache_text_embeddings=true", "train.steps=2",
                                  "sample.prompts=[a red circle]", "sample.steps=2",
                                  f"data.cache_dir={tmp_path / 'cache'}"))
    run.build()
    # On a CPU the text encoder is already in the only memory there is; only the VAE encoder goes.
    assert run.released == {"vae.encoder": "released"}
    assert not any(p.is_meta for p in run.base.vae.decoder.parameters())
    run.fit()
    grids = sorted((run.output_dir / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).getextrema() != ((0, 0), (0, 0), (0, 0))


def test_borrowed_refuses_released_modules():
    from sdlora.training import offload

    here = torch.nn.Linear(2, 2)
    with offload.borrowed([here], torch.device("cpu")):
        assert here.weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="released after caching"):
        with offload.borrowed([torch.nn.Linear(2, 2).to("meta")], torch.device("cpu")):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_borrowed_round_trips_a_parked_text_encoder():
    from sdlora.training import offload

    parked = torch.nn.Linear(2, 2)
    with offload.borrowed([parked], torch.device("cuda")):
        assert parked.weight.is_cuda
    assert parked.weight.device.type == "cpu"


# -- speed levers -------------------------------------------------------------------------------------------------


def test_loader_never_respawns_workers_and_pins_for_cuda(make_config):
    from sdlora.data.loader import loader_options

    assert loader_options(0, torch.device("cpu")) == {"pin_memory": False}
    assert loader_options(2, torch.device("cuda")) == {"pin_memory": True, "persistent_workers": True,
                                                        "prefetch_factor": 2}
    run = TrainingRun(make_config("data.num_workers=1"))
    run.build()
    loader = run.data_loader(0)
    assert loader.persistent_workers and loader.num_workers == 1


def test_channels_last_and_compile_are_applied(make_config):
    run = TrainingRun(make_config("train.channels_last=true", "train.compile=true"))
    run.build()
    unet = run.base.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert unet._compiled_call_impl is not None
    # Compilation in place keeps the parameter names, so adapters and checkpoints are unchanged.
    assert all("_orig_mod" not in name for name, _ in unet.named_parameters())


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


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_pipeline_decodes_with_a_vae_kept_in_fp32_under_half_precision_weights(arch):
    """fp16 training keeps the VAE in fp32 (`models.vae_dtype_for`) while the UNet and text encoders are fp16, and
    samples build their pipeline from those parts: the denoised latents arrive in the UNet's dtype and must still
    decode. bf16 stands in for fp16 here (a CPU has no fp16 convolutions); the dtype mismatch is the same."""
    from sdlora import inference
    from sdlora.bench import archs

    base = archs.build_random_base(arch, frozen_dtype=torch.bfloat16)
    assert base.vae.dtype == torch.float32 and base.unet.dtype == torch.bfloat16
    pipe = inference.build_pipeline(base, dtype=torch.bfloat16)
    assert pipe.vae.dtype == torch.float32  # kept: an fp16 VAE overflows to black images
    (image,) = inference.generate(pipe, "a cat", steps=2, height=64, width=64)
    assert image.size == (64, 64)


def test_released_encoders_go_to_meta_even_with_their_own_parameter_type():
    """bitsandbytes' 4-bit weights (an nf4 base's text encoder) return their own Parameter type from `.to()`, and
    `module.to("meta")` then fails; releasing a cached run's encoders must still free them."""
    from types import SimpleNamespace

    from sdlora.training import offload

    class Packed(torch.nn.Parameter):  # what bitsandbytes.nn.Params4bit does in .to()
        def to(self, *args, **kwargs):
            return Packed(super().to(*args, **kwargs), requires_grad=False)

    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    encoder[0].weight = Packed(encoder[0].weight.data, requires_grad=False)
    probe = torch.nn.Linear(4, 4)
    probe.weight = Packed(probe.weight.data, requires_grad=False)
    with pytest.raises(RuntimeError, match="Parameter"):
        probe.to("meta")  # the failure being avoided
    base = SimpleNamespace(vae=None, text_encoders={"text_encoder": encoder})
    moved = offload.release_cached_encoders(base, torch.device("cpu"), latents_cached=False, text_cached=True,
                                            text_trained=False, samples_wanted=False)
    assert moved == {"text_encoder": "meta"}
    assert all(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    assert encoder[0].weight.shape == (4, 4) and not encoder[0].weight.requires_grad

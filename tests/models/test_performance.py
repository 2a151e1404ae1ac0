"""Performance levers: hardware-chosen precision, small frozen-weight storage, QLoRA, cached inputs, loader options."""

from __future__ import annotations

import copy
import math

import pytest
import torch

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

    # 20 steps at 1e-2 lower the fixed-draw loss to 0.79x (measured), as 40 at 5e-3 did (0.75x), in half the time.
    run = TrainingRun(make_config("model.quantize=int8", "train.steps=20", "train.batch_size=4",
                                  "train.learning_rate=1e-2", "lora.rank=8"))
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

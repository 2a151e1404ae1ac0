"""The CUDA paths, on the tiny bases: `pytest -m gpu` on a machine with a CUDA GPU (every test here is skipped
without one, and the default run deselects the `gpu` marker). scripts/gpu_check.sh runs these and the GPU bench.

Each training test goes through `TrainingRun.build` + `fit`, exactly what `sdlora train` runs, and checks what a
user would see: finite losses, a finite adapter file, sample images that are not black (a NaN or overflowed decode
comes out black).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from adapter_factory import make_adapter
from PIL import Image

from sdlora import formats, inference
from sdlora.formats import read_adapter
from sdlora.models import backends, load_base_model, lora
from sdlora.training.run import TrainingRun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_bnb = pytest.mark.skipif(not backends.bitsandbytes_available(),
                               reason="needs bitsandbytes (pip install sdlora[bnb])")

SAMPLES = ("sample.prompts=[a red circle]", "sample.steps=4")


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one process-wide state and refuses a second mixed precision in the same process (as
    `sdlora train`, one run per process, never asks): these tests switch between fp16 and bf16, so each starts
    from a clean state. Seen on the first GPU run: every bf16 test after the fp16 ones failed in Accelerator()."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _assert_finite_run(run: TrainingRun, result) -> None:
    assert run.accelerator.device.type == "cuda"
    assert result.losses and all(math.isfinite(loss) for loss in result.losses), result.losses
    adapter = read_adapter(result.adapter_path)
    tensors = [t for component in adapter.tensors.values() for t in component.values()]
    assert tensors and all(bool(torch.isfinite(t.float()).all()) for t in tensors)
    # Trained: the up projections start at zero and must have moved.
    assert any(float(t.abs().max()) > 0 for key, t in adapter.tensors["unet"].items() if "lora_B" in key)


def _assert_samples_visible(result) -> None:
    assert result.samples, "no sample grid written"
    pixels = np.asarray(Image.open(result.samples[-1]).convert("RGB"))
    assert pixels.max() > 0, "black samples (a NaN or overflowed decode)"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_mixed_precision_training_ends_finite_with_visible_samples(make_config, tiny_sdxl_base, precision, family):
    extra = [f"model.base={tiny_sdxl_base}"] if family == "sdxl" else []
    run = TrainingRun(make_config(f"train.mixed_precision={precision}", "train.steps=6", *SAMPLES, *extra))
    run.build()
    assert run.accelerator.mixed_precision == precision
    assert run.base.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert all(p.dtype == torch.float32 for p in run.parts.params)  # LoRA weights train in fp32
    if precision == "fp16":
        assert run.accelerator.scaler is not None  # the fp16 gradient scaler is on
        assert run.base.vae.dtype == torch.float32
    result = run.fit()
    _assert_finite_run(run, result)
    _assert_samples_visible(result)


def test_cached_checkpointed_bf16_run_trains_on_cuda(make_config):
    run = TrainingRun(make_config("train.mixed_precision=bf16", "train.gradient_checkpointing=true",
                                  "data.cache_latents=true", "data.cache_text_embeddings=true", *SAMPLES))
    run.build()
    # With sample prompts on a GPU the frozen text encoder waits in CPU memory until samples borrow it back.
    assert run.released.get("text_encoder") == "cpu"
    result = run.fit()
    _assert_finite_run(run, result)
    _assert_samples_visible(result)


@needs_bnb
def test_adamw8bit_trains_on_cuda(make_config):
    run = TrainingRun(make_config("train.mixed_precision=bf16", "train.optimizer=adamw8bit", "train.steps=6"))
    run.build()
    assert "bitsandbytes" in type(run.parts.optimizer.optimizer).__module__
    _assert_finite_run(run, run.fit())


@needs_bnb
def test_nf4_base_trains_and_its_adapter_has_the_full_precision_keys(make_config, tmp_path):
    import bitsandbytes as bnb

    run = TrainingRun(make_config("model.quantize=nf4", "train.mixed_precision=bf16", "train.steps=6", *SAMPLES))
    run.build()
    attn = run.base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q.base_layer, bnb.nn.Linear4bit)
    result = run.fit()
    _assert_finite_run(run, result)
    _assert_samples_visible(result)
    plain = TrainingRun(make_config("train.mixed_precision=bf16", "train.steps=1", f"output.dir={tmp_path / 'plain'}"))
    plain.build()
    assert set(read_adapter(result.adapter_path).tensors["unet"]) == set(lora.lora_state_dict(plain.base.unet))


def _image(pipe) -> np.ndarray:
    (image,) = inference.generate(pipe, "a red circle", seed=3, steps=4, guidance_scale=5.0, height=64, width=64)
    return np.asarray(image, np.int16)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2), (torch.float16, 12)])
def test_fused_generation_matches_unfused_on_cuda(tiny_base, tmp_path, dtype, tolerance):
    """Fusing merges the adapters into the weights; on CUDA (and in fp16, where the merged weights round once more)
    the images must still match the unfused stack's, and unfuse must give the unfused images back."""
    base_model = load_base_model(str(tiny_base))
    files = [
        formats.save_diffusers(tmp_path / "a.safetensors", make_adapter(base_model.unet, base_model.text_encoder,
                                                                          seed=1)),
        formats.save_diffusers(tmp_path / "b.safetensors", make_adapter(base_model.unet, base_model.text_encoder,
                                                                          seed=2, rank=2, alpha=1.0)),
    ]
    pipe = inference.build_pipeline(base_model, device="cuda", dtype=dtype)
    base = _image(pipe)
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(files[0]), 0.7),
                                            inference.AdapterSpec(str(files[1]), 1.0, 0.5)])
    unfused = _image(pipe)
    stack.fuse()
    fused = _image(pipe)
    stack.unfuse()
    again = _image(pipe)
    assert base.max() > 0 and unfused.max() > 0
    assert np.abs(fused - unfused).max() <= tolerance, np.abs(fused - unfused).max()
    assert np.abs(fused - base).max() > 10
    assert np.abs(again - unfused).max() <= 1

"""scripts/bench.py trains the SD3 family: the published SD3.5 shapes through the same TrainingRun as every arch."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sdlora.bench import archs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one mixed precision per process (`sdlora train` runs one per process): the bf16 bench run
    here must neither see nor leave another test's state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _bench_script():
    spec = importlib.util.spec_from_file_location("sdlora_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_trains_tiny_sd3_and_reports_every_field(capsys):
    """The command scripts/gpu_check.sh runs for SD3.5 Medium, at tiny scale: every lever that works on a CPU (bf16,
    checkpointing, cached encoders), the same JSON fields as the UNet archs, finite losses, all encoders freed."""
    from sdlora.bench.benchmark import TrainBenchOptions

    bench = _bench_script()
    assert bench.main(["--arch", "tiny-sd3", "--resolution", "64", "--rank", "4", "--steps", "2", "--warmup", "1",
                       "--no-flops", "--precision", "bf16", "--checkpointing", "--cached", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for _, key, _ in bench.TRAIN_ROWS:
        assert key in result, key
    assert set(asdict(TrainBenchOptions())) <= set(result)
    assert result["arch"] == "tiny-sd3" and result["t5"] is True and result["precision_used"] == "bf16"
    assert result["losses_finite"] and result["params_finite"]
    assert all(math.isfinite(result[key]) for key in ("step_median_s", "build_s", "peak_rss_process_gb"))
    assert 0 < result["step_min_s"] <= result["step_median_s"] <= result["step_max_s"]
    assert result["trainable_params"] > 0 and result["frozen_unet_gb"] > 0
    # The cache holds the joint states and pooled embeddings: T5 leaves memory with the two CLIPs and the VAE.
    assert result["freed_after_caching"] == "text_encoder, text_encoder_2, text_encoder_3, vae, vae.encoder"
    assert (result["peak_cuda_gb"] is None) == (not torch.cuda.is_available())


def test_bench_sd35_medium_is_built_with_the_published_parameter_counts():
    """The builder the bench trains with, on the meta device: SD3.5 Medium's real sizes (as in test_sd3_shapes),
    SD3's flow scheduler, and T5 left out with --no-t5."""
    base = archs.build_random_base("sd3.5-medium", frozen_dtype=torch.bfloat16, init_device="meta")
    assert base.family == "sd3" and type(base.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert base.scheduler.config.shift == 3.0
    assert archs.count(base.unet) == 2_243_171_520
    assert archs.count(base.text_encoder) == 123_650_304
    assert archs.count(base.text_encoder_2) == 694_659_840
    assert archs.count(base.text_encoder_3) == 4_762_310_656
    assert archs.count(base.vae) == 83_819_683 and base.vae.config.latent_channels == 16
    assert base.unet.dtype == torch.bfloat16 and base.vae.dtype == torch.float32  # as load_base_model loads it
    assert not any(p.requires_grad for p in base.unet.parameters())
    # The tokenizers' ids fall inside the real embeddings (random weights, real vocabulary sizes).
    assert len(base.tokenizer) <= base.text_encoder.config.vocab_size
    assert len(base.tokenizer_3) <= base.text_encoder_3.config.vocab_size

    no_t5 = archs.build_random_base("sd3.5-large", init_device="meta", use_t5=False)
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    assert archs.count(no_t5.unet) == 8_056_627_520
    assert set(no_t5.text_encoders) == {"text_encoder", "text_encoder_2"}


def test_bench_script_refuses_what_it_cannot_measure_in_one_line(capsys):
    """Bad combinations stop before anything is built: one line naming the option, argparse's exit status 2."""
    bench = _bench_script()
    for argv, message in ((["--arch", "tiny-sd3", "--generate"], "--arch tiny-sd3 is measured in training only"),
                          (["--arch", "tiny", "--no-t5"], "--no-t5: only the SD3 archs have a T5 encoder")):
        with pytest.raises(SystemExit) as stopped:
            bench.run_main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs where there is CUDA")
def test_bench_script_reports_run_errors_in_one_line(capsys):
    """A refusal from the run itself (nf4 without CUDA, as on a dry run of gpu_check.sh) is one line and exit status
    2 too, not a traceback in gpu_check's failures.txt."""
    bench = _bench_script()
    assert bench.run_main(["--arch", "tiny-sd3", "--resolution", "64", "--quantize", "nf4", "--steps", "1",
                           "--warmup", "0", "--no-flops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bench.py: error: model.quantize=nf4 needs a CUDA GPU")
    assert not any("Traceback" in line for line in err)

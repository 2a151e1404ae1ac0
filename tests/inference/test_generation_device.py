"""`sdlora generate` and `grid` use the GPU when there is one (they ran on the CPU in fp32 before, whatever the
machine had), in a dtype that cannot overflow SD's VAE."""

from __future__ import annotations

import torch

from sdlora import inference


def test_cpu_only_machines_generate_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference.generation_device() == (torch.device("cpu"), torch.float32)


def test_a_gpu_generates_in_bf16_where_it_can_and_never_in_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert inference.generation_device() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # pre-Ampere: fp32, not fp16
    assert inference.generation_device() == (torch.device("cuda"), torch.float32)


def test_the_cli_builds_its_pipeline_where_generation_device_says(monkeypatch, tiny_base):
    from sdlora import cli

    seen = {}

    def recording_build(base, scheduler="ddim", device="cpu", dtype=torch.float32, progress=False):
        seen.update(device=device, dtype=dtype)
        raise SystemExit(0)  # the pipeline itself is not needed

    monkeypatch.setattr(inference, "generation_device", lambda: (torch.device("cpu"), torch.bfloat16))
    monkeypatch.setattr(inference, "build_pipeline", recording_build)
    try:
        cli.main(["generate", "--base", str(tiny_base), "--prompt", "a red circle"])
    except SystemExit:
        pass
    assert seen == {"device": torch.device("cpu"), "dtype": torch.bfloat16}

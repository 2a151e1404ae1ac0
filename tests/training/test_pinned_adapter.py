"""Refactors must not change what training computes: the same seed and config give the same adapter, bit for bit.

`tests/assets/pinned_adapter.safetensors` was first written by sdlora 0.1.0 at commit 5b47eba (the last flat-package
release) and re-pinned at 480eb94, where the tokenizer fix of 15099ae changed the tiny base (its vocabulary size, so
its random initialisation), both on the project's 2-core x86-64 CPU machines with torch 2.13.0 (constraints.txt) and 2
threads. Float results depend on the torch build and the thread count (Adam turns last-bit gradient differences into
lr-sized steps, so no tolerance could both absorb them and still catch a real change): the test runs with the
reference thread count and skips under another torch, where it cannot say anything.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import write_shapes_dataset
from safetensors.torch import load_file

PINNED = os.path.join(os.path.dirname(__file__), os.pardir, "assets", "pinned_adapter.safetensors")
REFERENCE_TORCH, REFERENCE_THREADS = "2.13.0", 2


@pytest.fixture
def reference_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(torch.__version__.split("+")[0] != REFERENCE_TORCH,
                    reason=f"the pinned adapter was computed with torch {REFERENCE_TORCH}")
def test_same_seed_and_config_give_the_pinned_adapter(tiny_base, tmp_path, reference_threads):
    from sdlora.config import load_config
    from sdlora.training.run import train

    data = write_shapes_dataset(tmp_path / "style", 8)
    config = load_config(None, [
        f"model.base={tiny_base}", f"data.path={data}", "data.resolution=64", "train.steps=3",
        "train.batch_size=2", "train.learning_rate=1e-3", f"output.dir={tmp_path / 'run'}",
        "lora.train_text_encoder=true",
    ])
    result = train(config)
    got, pinned = load_file(result.adapter_path), load_file(PINNED)
    assert sorted(got) == sorted(pinned)
    assert any(k.startswith("text_encoder.") for k in pinned) and any(k.startswith("unet.") for k in pinned)
    # The adapter moved away from its initialisation (B starts at zero), or the comparison would prove little.
    assert any(t.abs().max() > 0 for k, t in pinned.items() if "lora_B" in k)
    differing = [key for key in pinned if not torch.equal(got[key], pinned[key])]
    assert not differing, f"{len(differing)} of {len(pinned)} tensors differ from the pinned adapter: {differing[:3]}"

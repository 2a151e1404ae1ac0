"""Every adapter type (lora, LoCon, DoRA, LoHa, LoKr) trains on the tiny base, its checkpoint holds the type's own
tensors, and a resumed run ends where an uninterrupted one does (the acceptance-1 "trains" and "resume" cells)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun

# (config overrides, a peft parameter name part that only this type has)
TYPES = {
    "lora": ([], "lora_B"),
    "locon": (["lora.conv_rank=2", "lora.conv_alpha=1"], "resnets.0.conv1.lora_B"),
    "dora": (["lora.type=dora"], "lora_magnitude_vector"),
    "loha": (["lora.type=loha"], "hada_w2_a"),
    "lokr": (["lora.type=lokr", "lora.decompose_both=true"], "lokr_w1"),
}


def _fixed_loss(run: TrainingRun, batch) -> float:
    """Loss on fixed noise and timesteps (a freshly seeded generator), so two evaluations compare."""
    parts = run.parts
    saved = parts.generator.get_state()
    parts.generator.manual_seed(1234)
    parts.unet.eval()
    with torch.no_grad():
        loss = train_loop.micro_step_loss(parts, batch).item()
    parts.generator.set_state(saved)
    parts.unet.train()
    return loss


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_trains_and_resumes_exactly(kind, tiny_base, style_dataset, tmp_path):
    from sdlora.data import collate

    overrides, own_part = TYPES[kind]
    common = [f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64", "train.batch_size=2",
              "train.learning_rate=1e-2", "train.steps=4", *overrides]

    def run(name: str, *extra: str) -> TrainingRun:
        made = TrainingRun(load_config(None, [*common, f"output.dir={tmp_path / name}", *extra]))
        made.build()
        return made

    straight = run("straight")
    trained = [n for n, p in straight.base.unet.named_parameters() if p.requires_grad]
    assert any(own_part in n for n in trained), (kind, trained[:4])  # the type's own tensors are what trains
    batch = collate([straight.dataset[(0, i)] for i in range(2)])
    before = _fixed_loss(straight, batch)
    full = straight.fit()
    after = _fixed_loss(straight, batch)
    assert after < before, (kind, before, after)

    first = run("resumed", "train.checkpoint_every=2")
    # Stop after 2 steps: the same as a run killed right after its step-2 checkpoint.
    first.config = first.config.model_copy(update={"train": first.config.train.model_copy(update={"steps": 2})})
    first.fit()
    checkpointed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert any(own_part in key for key in checkpointed), kind  # the checkpoint holds this type's state
    resumed = run("resumed", "train.checkpoint_every=2").fit(resume="latest")
    assert resumed.final_step == 4 and resumed.losses == pytest.approx(full.losses[2:], abs=1e-6)

    a, b = load_file(str(full.adapter_path)), load_file(str(resumed.adapter_path))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (kind, key)

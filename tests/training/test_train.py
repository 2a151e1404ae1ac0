"""Training trains, touches only LoRA weights, and resumes to the same result."""

from __future__ import annotations

import torch

from sdlora.formats import read_adapter
from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun


def _eval_loss(run: TrainingRun, batch) -> float:
    """Loss on fixed latents, noise and timesteps (a fresh seeded generator), so two evaluations compare."""
    parts = run.parts
    saved = parts.generator.get_state()
    parts.generator.manual_seed(1234)
    run.parts.unet.eval()
    with torch.no_grad():
        loss = train_loop.micro_step_loss(parts, batch).item()
    parts.generator.set_state(saved)
    return loss


def test_training_lowers_the_loss_and_changes_only_lora(make_config):
    config = make_config("train.steps=60", "train.batch_size=4", "train.learning_rate=3e-3", "lora.rank=8")
    run = TrainingRun(config)
    run.build()
    frozen_before = {
        name: p.detach().clone() for name, p in run.base.unet.named_parameters() if "lora_" not in name
    }
    lora_before = {name: p.detach().clone() for name, p in run.base.unet.named_parameters() if "lora_" in name}
    batch = train_loop_batch(run)
    before = _eval_loss(run, batch)
    result = run.fit()
    after = _eval_loss(run, batch)
    assert len(result.losses) == 60
    assert after < 0.8 * before, (before, after)
    for name, param in run.base.unet.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(param, frozen_before[name]), f"frozen weight {name} changed"
    changed = [n for n, p in run.base.unet.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])]
    assert changed, "no LoRA weight moved"
    assert all(p.dtype == torch.float32 for n, p in run.base.unet.named_parameters() if "lora_" in n)


def train_loop_batch(run: TrainingRun):
    from sdlora.data import collate

    return collate([run.dataset[(0, i)] for i in range(4)])


def test_resume_gives_the_same_adapter(make_config, tmp_path):
    common = ["train.steps=6", "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "lora.dropout=0.1",
              "data.random_flip=true", "data.crop=random", "train.noise_offset=0.05"]
    straight = TrainingRun(make_config(*common, f"output.dir={tmp_path / 'straight'}"))
    straight.build()
    full = straight.fit()

    first = TrainingRun(make_config(*common, "train.checkpoint_every=3", f"output.dir={tmp_path / 'resumed'}"))
    first.build()
    first.parts.lr_scheduler  # noqa: B018 - built
    # Stop after 3 steps: the same as a run killed right after its step-3 checkpoint.
    first.config = first.config.model_copy(update={"train": first.config.train.model_copy(update={"steps": 3})})
    first.fit()
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003").is_dir()

    second = TrainingRun(make_config(*common, "train.checkpoint_every=3", f"output.dir={tmp_path / 'resumed'}"))
    second.build()
    resumed = second.fit(resume="latest")
    assert resumed.final_step == 6 and len(resumed.losses) == 3
    assert resumed.losses == full.losses[3:]

    a = read_adapter(full.adapter_path).tensors["unet"]
    b = read_adapter(resumed.adapter_path).tensors["unet"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_text_encoder_lora_trains_and_saves(make_config):
    config = make_config("lora.train_text_encoder=true", "train.steps=3", "train.text_encoder_learning_rate=5e-3")
    run = TrainingRun(config)
    run.build()
    result = run.fit()
    adapter = read_adapter(result.adapter_path)
    assert set(adapter.components) == {"unet", "text_encoder"}
    keys = adapter.tensors["text_encoder"]
    assert any(k.endswith("self_attn.q_proj.lora_A.weight") for k in keys)
    assert any(k.endswith("self_attn.out_proj.lora_B.weight") for k in keys)
    assert len(run.parts.optimizer.param_groups) == 2
    assert run.parts.optimizer.param_groups[1]["lr"] != run.parts.optimizer.param_groups[0]["lr"]

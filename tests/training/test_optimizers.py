"""Optimizers, LoRA+, loss types and the timestep range: each trains the tiny base, and each knob does what it says."""

from __future__ import annotations

import dataclasses
import importlib
import itertools

import pytest
import torch
from test_train import train_loop_batch

from sdlora.config import ConfigError
from sdlora.training import diffusion, optim
from sdlora.training.loop import fit, micro_step_loss
from sdlora.training.run import TrainingRun


@pytest.fixture(scope="module")
def tiny_run(tiny_base, style_dataset, tmp_path_factory):
    """One built run shared by the optimizer and loss-type cases: each puts its LoRA back to the start first."""
    from sdlora.config import load_config

    config = load_config(None, [f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64",
                                "train.batch_size=2", "lora.rank=8",
                                f"output.dir={tmp_path_factory.mktemp('optim') / 'run'}"])
    run = TrainingRun(config)
    run.build()
    start = {n: p.detach().clone() for n, p in run.base.unet.named_parameters() if p.requires_grad}
    return run, start, train_loop_batch(run)


class _SameDraws:
    """Hooks that reseed the run's generator after each step: every step sees the same noise and timesteps, so
    the loss of a fixed batch must fall steadily if the optimizer and the loss train at all."""

    def __init__(self, generator):
        self.generator = generator

    def after_step(self, step, loss, lr, grad_norm=None):
        self.generator.manual_seed(0)

    def should_stop(self):
        return False


def _loss_falls(tiny_run, steps: int = 8, factor: float = 0.92, **train) -> None:
    run, start, batch = tiny_run
    with torch.no_grad():
        for name, param in run.base.unet.named_parameters():
            if name in start:
                param.copy_(start[name])
    config = run.config.model_copy(update={"train": run.config.train.model_copy(update=train)})
    named = [(n, p) for n, p in run.base.unet.named_parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(config, named, [])
    parts = dataclasses.replace(
        run.parts, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        loss=diffusion.LossSpec(config.train.loss_type, config.train.huber_c, config.train.huber_schedule),
    )
    parts.generator.manual_seed(0)
    losses = fit(parts, itertools.repeat(batch), 0, steps, _SameDraws(parts.generator))
    with optim.evaluation_weights(optimizer):  # schedule-free: judge the averaged weights, as the run saves them
        parts.generator.manual_seed(0)
        with torch.no_grad():
            after = micro_step_loss(parts, batch).item()
    assert after < factor * losses[0], (train, losses, after)


@pytest.mark.parametrize("optimizer, lr, args", [
    ("adamw", 1e-2, {}),
    # Prodigy estimates its own step size from d0 up (1.0 is the authors' advice for learning_rate); its default
    # d0 = 1e-6 needs far more than a test's steps to grow, so the test starts it higher.
    ("prodigy", 1.0, {"d0": 1e-3}),
    ("adamw_schedulefree", 1e-2, {}),
    ("adafactor", 1e-2, {}),
    ("lion", 1e-2, {}),
])
def test_each_optimizer_trains_the_tiny_base(tiny_run, optimizer, lr, args):
    pytest.importorskip({"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree",
                         "lion": "lion_pytorch"}.get(optimizer, "torch"))
    _loss_falls(tiny_run, optimizer=optimizer, learning_rate=lr, optimizer_args=args)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_each_loss_type_trains_the_tiny_base(tiny_run, loss_type):
    _loss_falls(tiny_run, loss_type=loss_type, learning_rate=1e-2)


def test_lora_plus_gives_the_b_matrices_ratio_times_the_learning_rate(make_config):
    config = make_config("train.lora_plus_ratio=16", "train.learning_rate=1e-4", "lora.train_text_encoder=true",
                         "train.text_encoder_learning_rate=5e-5")
    run = TrainingRun(config)
    run.build()
    lr_of = {id(p): group["lr"] for group in run.parts.optimizer.param_groups for p in group["params"]}
    named = {"unet": run.base.unet.named_parameters(), "te": run.base.text_encoder.named_parameters()}
    seen = {"unet": set(), "te": set()}
    for model, params in named.items():
        base_lr = 1e-4 if model == "unet" else 5e-5
        for name, param in params:
            if not param.requires_grad:
                continue
            expected = base_lr * 16 if "lora_B" in name else base_lr
            assert lr_of[id(param)] == pytest.approx(expected), name
            seen[model].add("B" if "lora_B" in name else "A")
    assert seen == {"unet": {"A", "B"}, "te": {"A", "B"}}
    # The schedule scales every group from its own rate: after the first step B stays at 16x A.
    run.fit()
    rates = sorted({group["lr"] for group in run.parts.optimizer.param_groups})
    assert rates == pytest.approx([5e-5, 1e-4, 8e-4, 16e-4])


def test_a_missing_optional_optimizer_is_one_line_naming_the_extra(make_config, monkeypatch):
    real = importlib.import_module

    def no_prodigy(name, *args):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_prodigy)
    config = make_config("train.optimizer=prodigy")
    with pytest.raises(ConfigError, match=r"train\.optimizer: prodigy needs the prodigyopt package: "
                                          r"`pip install sdlora\[optimizers\]`"):
        optim.build_optimizer(config, [("w", torch.nn.Parameter(torch.zeros(2)))], [])


def test_huber_losses_are_l2_near_zero_and_l1_far_away():
    scheduler = type("S", (), {"config": type("C", (), {"num_train_timesteps": 1000})()})()
    t = torch.zeros(1, dtype=torch.long)
    small, large = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 100.0)
    zero = torch.zeros(1, 1, 1, 1)
    huber = diffusion.LossSpec("huber", 0.1, "constant")
    smooth = diffusion.LossSpec("smooth_l1", 0.1, "constant")
    assert diffusion.elementwise_loss(small, zero, huber, scheduler, t).item() == pytest.approx(1e-6, rel=1e-2)
    assert diffusion.elementwise_loss(large, zero, smooth, scheduler, t).item() == pytest.approx(2 * 99.9, rel=1e-4)


def test_huber_schedules_follow_the_published_formulas():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 250, 999])
    assert torch.allclose(diffusion.huber_thresholds(diffusion.LossSpec("huber", 0.1, "constant"), scheduler, t),
                          torch.full((3,), 0.1))
    exponential = diffusion.huber_thresholds(diffusion.LossSpec("huber", 0.1, "exponential"), scheduler, t)
    assert exponential[0].item() == pytest.approx(1.0) and exponential[2].item() == pytest.approx(0.1, rel=0.01)
    snr = diffusion.huber_thresholds(diffusion.LossSpec("huber", 0.1, "snr"), scheduler, t)
    alpha_bar = scheduler.alphas_cumprod[t]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    assert torch.allclose(snr, 0.9 / (1 + sigma) ** 2 + 0.1)
    assert snr[0] > snr[1] > snr[2]  # near L2 at low noise, near L1 at high noise


def test_the_timestep_range_bounds_the_draws_and_the_default_draws_as_before():
    gen = torch.Generator().manual_seed(3)
    drawn = diffusion.sample_timesteps(4096, 1000, gen, "cpu", (200, 400))
    assert drawn.min().item() == 200 and drawn.max().item() == 399
    before = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(diffusion.sample_timesteps(64, 1000, torch.Generator().manual_seed(5), "cpu"), before)
    with pytest.raises(ConfigError, match=r"train\.max_timestep \(2000\) is above"):
        diffusion.sample_timesteps(1, 1000, gen, "cpu", (0, 2000))


def test_a_timestep_range_run_trains_only_those_timesteps(make_config, monkeypatch):
    seen = []
    real = diffusion.sample_timesteps

    def record(*args, **kwargs):
        drawn = real(*args, **kwargs)
        seen.append(drawn)
        return drawn

    monkeypatch.setattr(diffusion, "sample_timesteps", record)
    run = TrainingRun(make_config("train.min_timestep=500", "train.max_timestep=600", "train.steps=3"))
    run.build()
    run.fit()
    drawn = torch.cat(seen)
    assert len(drawn) == 3 * 2 and drawn.min() >= 500 and drawn.max() < 600


def test_an_empty_timestep_range_is_refused_at_load(make_config):
    with pytest.raises(ConfigError, match=r"train\.min_timestep \(500\) must be below train\.max_timestep \(500\)"):
        make_config("train.min_timestep=500", "train.max_timestep=500")


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree", "adafactor", "lion"])
def test_each_optimizer_resumes_exactly_from_a_checkpoint(make_config, optimizer, tmp_path):
    """The optimizer's state goes through sdlora's checkpoint files (tensors and JSON, no pickle) and the next step
    after loading it is the step an uninterrupted optimizer takes, bit for bit."""
    pytest.importorskip({"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree",
                         "lion": "lion_pytorch"}.get(optimizer, "torch"))
    from sdlora.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint

    lora_plus = ["train.lora_plus_ratio=4"] if optimizer != "prodigy" else []  # prodigy: one rate only
    config = make_config(f"train.optimizer={optimizer}", *lora_plus)
    gradients = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def fresh():
        a = torch.nn.Parameter(torch.ones(3, 5))
        b = torch.nn.Parameter(torch.full((3, 5), 0.5))
        opt = optim.build_optimizer(config, [("x.lora_A.default.weight", a), ("x.lora_B.default.weight", b)], [])
        optim.set_train_mode(opt)
        return (a, b), opt

    def step(params, opt, gradient):
        for p in params:
            p.grad = gradient.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)

    params, opt = fresh()
    for gradient in gradients[:2]:
        step(params, opt, gradient)
    saved = [p.detach().clone() for p in params]
    path = save_checkpoint(tmp_path, TrainingState(2, 2, {"w": saved[0]}, opt.state_dict(), {}, None, {}, {}), 2)
    for gradient in gradients[2:]:
        step(params, opt, gradient)

    resumed, opt2 = fresh()
    with torch.no_grad():
        for p, value in zip(resumed, saved):
            p.copy_(value)
    opt2.load_state_dict(load_checkpoint(path).optimizer)
    for gradient in gradients[2:]:
        step(resumed, opt2, gradient)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q), optimizer


def test_an_argument_the_optimizer_does_not_take_is_one_line(make_config):
    config = make_config("train.optimizer_args={no_such_option: 1}")
    with pytest.raises(ConfigError, match=r"train\.optimizer_args: adamw refused them .*no_such_option"):
        optim.build_optimizer(config, [("w", torch.nn.Parameter(torch.zeros(2)))], [])


def test_prodigy_with_two_rates_is_refused_at_load(make_config):
    with pytest.raises(ConfigError, match=r"train\.lora_plus_ratio cannot be combined with train\.optimizer=prodigy"):
        make_config("train.optimizer=prodigy", "train.lora_plus_ratio=16")
    with pytest.raises(ConfigError, match=r"train\.text_encoder_learning_rate must equal train\.learning_rate"):
        make_config("train.optimizer=prodigy", "train.learning_rate=1.0", "train.text_encoder_learning_rate=0.5")


def test_schedule_free_evaluation_weights_are_the_average_and_the_training_point_comes_back_bit_exact():
    """Samples render inside `evaluation_weights`: the averaged point within, the exact training tensors after."""
    pytest.importorskip("schedulefree")
    import schedulefree

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64) * 1e3)  # large values: train() arithmetic rounds off
    optimizer = schedulefree.AdamWScheduleFree([weight], lr=0.5, warmup_steps=0)
    optimizer.train()
    for _ in range(5):
        optimizer.zero_grad()
        (weight.sin() * torch.randn(64, 64)).sum().backward()
        optimizer.step()
    before = weight.detach().clone()
    with optim.evaluation_weights(optimizer):
        assert not torch.equal(weight, before)  # the averaged point, not the training one
    assert torch.equal(weight, before)

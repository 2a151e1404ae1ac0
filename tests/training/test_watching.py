"""The adapter EMA and the TensorBoard logs of a run: the EMA file is the EMA formula over the weights the run
logged, both survive a resume bit for bit, and TensorBoard's own reader finds the scalars and the sample grids."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.config.monitoring import EmaSection
from sdlora.formats import read_adapter
from sdlora.training.ema import AdapterEma, decay_at
from sdlora.training.run import TrainingRun

STEPS = 4
WATCHED = ["ema.enabled=true", "ema.decay=0.8", "ema.warmup=true", "logging.tensorboard=true",
           "validation.fraction=0.25", "validation.every=2", "sample.prompts=[a red circle]", "sample.every=2",
           "sample.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=10", "lora.dropout=0.1"]


def _run(tiny_base, style_dataset, out, steps=None, resume=None):
    config = load_config(None, [f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64",
                                f"train.steps={STEPS}", "train.batch_size=2", "train.learning_rate=1e-3",
                                f"output.dir={out}", *WATCHED])
    run = TrainingRun(config)
    run.build()
    run.initial = {name: p.detach().clone() for name, p in run.checkpointer.trainable.items()}
    if steps is not None:  # stop early: the same as a run killed after its checkpoint at this step
        run.config = config.model_copy(update={"train": config.train.model_copy(update={"steps": steps})})
    run.result = run.fit(resume)
    return run


@pytest.fixture(scope="module")
def runs(tiny_base, style_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("watched")
    straight = _run(tiny_base, style_dataset, root / "straight")
    _run(tiny_base, style_dataset, root / "resumed", steps=3)
    resumed = _run(tiny_base, style_dataset, root / "resumed", resume=str(root / "resumed/checkpoints/step-000002"))
    return straight, resumed


def _adapter_key(name: str) -> tuple[str, str]:
    """'unet.<module>.lora_A.default.weight' (a live parameter) -> ('unet', '<module>.lora_A.weight') (the file)."""
    component, key = name.split(".", 1)
    return component, key.replace(".default.", ".")


def test_the_ema_file_is_the_ema_formula_over_the_logged_weights(runs):
    straight, _ = runs
    section = EmaSection(enabled=True, decay=0.8, warmup=True)
    average = {name: t.float().clone() for name, t in straight.initial.items()}
    for step in range(1, STEPS + 1):  # the raw weights after each step, as its checkpoint holds them
        raw = load_file(straight.folder.checkpoints / f"step-{step:06d}" / "trainable.safetensors")
        decay = decay_at(section, step - 1)
        assert decay == min(0.8, step / (9 + step))
        for name in average:
            average[name] = decay * average[name] + (1 - decay) * raw[name]
    ema = read_adapter(straight.folder.adapter("pytorch_lora_weights_ema")).tensors
    final = read_adapter(straight.result.adapter_path).tensors
    moved = 0
    for name, expected in average.items():
        component, key = _adapter_key(name)
        torch.testing.assert_close(ema[component][key], expected, rtol=1e-6, atol=1e-9)
        moved += not torch.equal(ema[component][key], final[component][key])
    assert moved, "the EMA file equals the raw adapter: nothing was averaged"


def test_ema_and_validation_survive_a_resume_bit_for_bit(runs):
    straight, resumed = runs
    for name in ("pytorch_lora_weights_ema", "pytorch_lora_weights"):
        a, b = load_file(straight.folder.adapter(name)), load_file(resumed.folder.adapter(name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [[json.loads(line) for line in run.folder.step_log.read_text().splitlines()] for run in runs]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0] if "val_loss" in r] == [2, 4]


def test_tensorboard_holds_the_scalars_and_the_sample_grids(runs):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    for run in runs:  # the resumed run's curves show each step once: the killed segment's step 3 is purged
        events = EventAccumulator(str(run.folder.root / "logs"), size_guidance={SCALARS: 0, IMAGES: 0})
        events.Reload()
        log = [json.loads(line) for line in run.folder.step_log.read_text().splitlines()]
        train = events.Scalars("loss/train")
        assert [e.step for e in train] == [1, 2, 3, 4]
        assert [e.value for e in train] == pytest.approx([row["loss"] for row in log], rel=1e-6)
        assert [e.value for e in events.Scalars("lr")] == pytest.approx([row["lr"] for row in log])
        validation = events.Scalars("loss/validation")
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in validation] == [
            (row["step"], row["val_loss"]) for row in log if "val_loss" in row]
        images = events.Images("samples")
        assert [e.step for e in images] == [2, 4]
        grid = Image.open(run.folder.sample_grid(4))
        assert (images[-1].width, images[-1].height) == grid.size
        assert {"loss/train", "lr", "loss/validation"} <= set(events.Tags()["scalars"])


def test_the_ema_is_swapped_in_and_the_raw_weights_come_back_exactly():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    ema = AdapterEma(EmaSection(enabled=True, decay=0.5), {"w": weight})
    raw = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    ema.after_step(1)
    expected = 0.5 * raw + 0.5 * (raw + 1.0)
    with ema.applied():
        torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(weight.detach(), raw + 1.0)


def test_asking_for_tensorboard_without_it_is_one_line(capsys, tmp_path, tiny_base, style_dataset, monkeypatch):
    from sdlora.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"base": str(tiny_base)}, "data": {"path": str(style_dataset)},
                                  "output": {"dir": str(tmp_path / "out")}, "logging": {"tensorboard": True}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sdlora: error:")]
    assert "Traceback" not in err and len(lines) == 1
    assert "logging.tensorboard: the tensorboard package is not installed: pip install tensorboard" in lines[0]


@pytest.mark.slow
def test_two_processes_validate_and_average_as_one(tiny_base, style_dataset, tmp_path, make_config):
    """DDP: every process scores the held-out set and keeps the EMA; one writes. The numbers equal one process's
    with the same effective batch, up to gloo's summation order."""
    from test_distributed import _run_config, _torchrun

    watch = ["validation.fraction=0.25", "validation.every=2", "ema.enabled=true", "ema.decay=0.5"]
    config = _run_config(tmp_path, tiny_base, style_dataset, batch_size=1, gradient_accumulation=2)
    launch = _torchrun("train", str(config), f"output.dir={tmp_path / 'ddp'}", *watch)
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err[-3000:]
    single = TrainingRun(make_config("train.batch_size=2", "train.gradient_accumulation=2", "train.seed=7",
                                     "train.learning_rate=2e-3", f"output.dir={tmp_path / 'single'}", *watch))
    single.build()
    single.fit()
    logs = [[json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
            for folder in (tmp_path / "ddp", tmp_path / "single")]
    assert len(logs[0]) == 4  # one writer
    scores = [{row["step"]: row["val_loss"] for row in log if "val_loss" in row} for log in logs]
    assert sorted(scores[0]) == [2, 4] and scores[0] == pytest.approx(scores[1], abs=1e-5)
    assert abs(scores[1][2] - scores[1][4]) > 1e-4  # training moved the score far more than the tolerance
    ema = [read_adapter(folder / "pytorch_lora_weights_ema.safetensors").tensors["unet"]
           for folder in (tmp_path / "ddp", tmp_path / "single")]
    for key in ema[1]:
        torch.testing.assert_close(ema[0][key], ema[1][key], atol=1e-4, rtol=0)


def _every_other_step(tiny_base, style_dataset, out, *extra):
    global WATCHED
    saved, WATCHED = WATCHED, ["ema.enabled=true", "ema.decay=0.8", "ema.every=2", "train.checkpoint_every=1",
                               "train.keep_checkpoints=10", *extra]
    try:
        return _run(tiny_base, style_dataset, out)
    finally:
        WATCHED = saved


def test_an_ema_every_n_steps_averages_those_steps_only_and_on_cpu_writes_the_same_file(
        tiny_base, style_dataset, tmp_path):
    device_run = _every_other_step(tiny_base, style_dataset, tmp_path / "device")
    average = {name: t.float().clone() for name, t in device_run.initial.items()}
    for step in (2, 4):  # steps 1 and 3 leave the average alone
        raw = load_file(device_run.folder.checkpoints / f"step-{step:06d}" / "trainable.safetensors")
        for name in average:
            average[name] = 0.8 * average[name] + 0.2 * raw[name]
    ema = read_adapter(device_run.folder.adapter("pytorch_lora_weights_ema"))
    assert ema.metadata["sdlora.ema_updates"] == "2" and device_run.monitor.ema.updates == 2
    for name, expected in average.items():
        component, key = _adapter_key(name)
        torch.testing.assert_close(ema.tensors[component][key], expected, rtol=1e-6, atol=1e-9)
    # An every-step average of the same weights differs: the skipped steps really were skipped.
    every_step = {name: t.float().clone() for name, t in device_run.initial.items()}
    for step in range(1, STEPS + 1):
        raw = load_file(device_run.folder.checkpoints / f"step-{step:06d}" / "trainable.safetensors")
        every_step = {n: 0.8 * every_step[n] + 0.2 * raw[n] for n in every_step}
    assert any(not torch.allclose(every_step[n], average[n], rtol=1e-4, atol=1e-7) for n in average)

    cpu_run = _every_other_step(tiny_base, style_dataset, tmp_path / "cpu", "ema.on_cpu=true")
    assert all(t.device.type == "cpu" for t in cpu_run.monitor.ema.shadow.values())
    # A CPU run's on-CPU EMA is the on-device one: the same tensors bit for bit, the same header but for the
    # training config it records (which names ema.on_cpu and its own output.dir).
    a, b = (read_adapter(run.folder.adapter("pytorch_lora_weights_ema")) for run in (device_run, cpu_run))
    for component in a.tensors:
        assert a.tensors[component].keys() == b.tensors[component].keys()
        assert all(torch.equal(t, b.tensors[component][k]) for k, t in a.tensors[component].items())
    configs = [json.loads(f.metadata.pop("sdlora.training_config")) for f in (a, b)]
    assert a.metadata == b.metadata
    assert (configs[0]["ema"]["on_cpu"], configs[1]["ema"]["on_cpu"]) == (False, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the EMA must leave the GPU")
def test_an_on_cpu_ema_of_gpu_weights_lives_on_the_cpu_and_equals_the_on_device_one():
    torch.manual_seed(0)
    weights = {"w": torch.nn.Parameter(torch.randn(64, 64, device="cuda"))}
    on_gpu = AdapterEma(EmaSection(enabled=True, decay=0.9, every=2), weights)
    on_cpu = AdapterEma(EmaSection(enabled=True, decay=0.9, every=2, on_cpu=True), weights)
    assert on_gpu.shadow["w"].device.type == "cuda" and on_cpu.shadow["w"].device.type == "cpu"
    for step in range(1, 7):
        with torch.no_grad():
            weights["w"].add_(torch.randn_like(weights["w"]))
        on_gpu.after_step(step)
        on_cpu.after_step(step)
    assert on_cpu.updates == on_gpu.updates == 3
    torch.testing.assert_close(on_cpu.shadow["w"], on_gpu.shadow["w"].cpu(), rtol=1e-6, atol=1e-6)
    with on_cpu.applied():
        assert weights["w"].device.type == "cuda"
        torch.testing.assert_close(weights["w"].detach().cpu(), on_cpu.shadow["w"])


def test_the_gradient_norm_before_clipping_is_logged_and_the_bar_shows_loss_lr_and_eta(
        tiny_base, style_dataset, tmp_path, capfd):
    """`grad_norm` is what accelerate's clip_grad_norm_ returns (the norm before clipping), in train_log.jsonl and
    TensorBoard; a tiny max_grad_norm makes every step clip, so a clipped norm would show."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    config = load_config(None, [f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64",
                                f"train.steps={STEPS}", "train.batch_size=2", f"output.dir={tmp_path / 'run'}",
                                "train.max_grad_norm=0.001", "logging.tensorboard=true"])
    run = TrainingRun(config)
    run.build()
    clip, measured, returned = run.accelerator.clip_grad_norm_, [], []

    def recording(params, max_norm):
        params = list(params)
        measured.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None])).item())
        returned.append(clip(params, max_norm))
        return returned[-1]

    run.accelerator.clip_grad_norm_ = recording
    run.fit()
    log = [json.loads(line) for line in run.folder.step_log.read_text().splitlines()]
    logged = [row["grad_norm"] for row in log]
    assert logged == [float(norm) for norm in returned]
    assert logged == pytest.approx(measured, rel=1e-5) and min(logged) > 0.01  # before clipping to 0.001
    events = EventAccumulator(str(run.folder.root / "logs"), size_guidance={SCALARS: 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("grad_norm")] == [
        (row["step"], pytest.approx(row["grad_norm"], rel=1e-6)) for row in log]
    bar = capfd.readouterr().err.splitlines()[-1].split("\r")[-1]
    assert f"{STEPS}/{STEPS} [" in bar and "<" in bar  # tqdm's elapsed<remaining (the ETA) ...
    assert f"loss={log[-1]['loss']:.4f}" in bar and f"lr={log[-1]['lr']:.2e}" in bar  # ... loss and lr


def test_without_clipping_the_norm_is_still_logged_and_the_weights_are_those_of_no_measuring(
        tiny_base, style_dataset, tmp_path):
    """train.max_grad_norm=null: the norm is measured by clip_grad_norm_ with an infinite limit, which scales every
    gradient by exactly 1.0: the adapter is bit for bit that of a run whose clip_grad_norm_ does nothing at all."""

    def run(name, measure):
        config = load_config(None, [f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64",
                                    f"train.steps={STEPS}", "train.batch_size=2", f"output.dir={tmp_path / name}",
                                    "train.max_grad_norm=null", "train.learning_rate=1e-2"])
        training = TrainingRun(config)
        training.build()
        if not measure:
            training.accelerator.clip_grad_norm_ = lambda params, max_norm: None
        training.fit()
        return training

    measured, untouched = run("measured", True), run("untouched", False)
    log = [json.loads(line) for line in measured.folder.step_log.read_text().splitlines()]
    assert len(log) == STEPS and all(row["grad_norm"] > 0 for row in log)
    assert all("grad_norm" not in json.loads(line) for line in untouched.folder.step_log.read_text().splitlines())
    a, b = (load_file(r.folder.adapter("pytorch_lora_weights")) for r in (measured, untouched))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [row["loss"] for row in log] == [json.loads(line)["loss"]
                                            for line in untouched.folder.step_log.read_text().splitlines()]

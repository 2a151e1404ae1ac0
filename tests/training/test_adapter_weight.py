"""Training images at an adapter weight (`adapter_weight`, a dial / slider LoRA): batches never mix weights, a batch
trains with the adapter at its weight, and everything after a step (samples, validation, the saved file) sees 1.0."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import write_shapes_dataset

from sdlora.config import ConfigError, load_config
from sdlora.data import DatasetError
from sdlora.data.preflight import check
from sdlora.models import lora
from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun


def _dial_dataset(root):
    """Six images at the usual weight, four at 0.5 (set by a dataset.toml), and a regularization folder."""
    write_shapes_dataset(root / "dial" / "full", 6, seed=1)
    write_shapes_dataset(root / "dial" / "half", 4, seed=2)
    (root / "dial" / "half" / "dataset.toml").write_text("adapter_weight = 0.5\n")
    write_shapes_dataset(root / "class", 4, style="plain", seed=3)
    return root / "dial", root / "class"


@pytest.fixture(scope="module")
def dial_run(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("dial")
    dial, klass = _dial_dataset(root)
    config = load_config(None, [
        f"model.base={tiny_base}", "data.resolution=64", "train.batch_size=2", f"output.dir={root / 'run'}",
        f"data.sources=[{{path: {dial}}}, {{path: {klass}, regularization: true}}]", "data.regularization.ratio=0.25",
        "data.cache_latents=true",
    ])
    run = TrainingRun(config)
    run.build()
    return run


def _scales(run) -> list[float]:
    return [scale for layer in lora.lora_layers(run.parts.unet) for scale in layer.scaling.values()]


def test_the_run_log_counts_images_by_weight(dial_run, caplog):
    from sdlora.data.preflight import log_summary

    with caplog.at_level("INFO", logger="sdlora.data.preflight"):
        log_summary(dial_run.report, "sdlora dataset check")
    assert "images by adapter weight 0.5: 4, 1: 6" in caplog.text


def test_batches_never_mix_weights_and_every_image_comes_each_epoch(dial_run):
    run = dial_run
    weights = {r.path.parent.name: r.adapter_weight for r in run.dataset.records}
    assert weights == {"full": 1.0, "half": 0.5, "class": 1.0}
    loader = run.data_loader(0)
    per_epoch = loader.batch_sampler.batches_per_epoch
    assert per_epoch == run.report.batches_per_epoch  # the preflight counts the sampler's batches
    for epoch_batches in itertools.islice(_epochs(loader, per_epoch), 2):
        seen = set()
        for batch in epoch_batches:
            assert len(set(batch["adapter_weights"].tolist())) == 1, batch["adapter_weights"]
            seen.update(batch["indices"].tolist())
        assert seen == set(range(len(run.dataset)))
    half = [b for b in next(_epochs(run.data_loader(0), per_epoch)) if b["adapter_weights"][0] == 0.5]
    assert len(half) == 2 and all(
        run.dataset.records[run.dataset.record_index(0, i)].path.parent.name == "half"
        for b in half for i in b["indices"].tolist())


def _epochs(loader, per_epoch):
    batches = iter(loader)
    while True:
        yield [next(batches) for _ in range(per_epoch)]


def test_a_batch_at_weight_half_trains_the_adapter_at_half(dial_run):
    """At weight w the loss is that of the adapter with every B scaled by w: the weight reaches every layer."""
    run, parts = dial_run, dial_run.parts
    layers = lora.lora_layers(parts.unet)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero, where every weight gives the same loss)
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.5)
    batch = next(b for b in run.data_loader(0) if b["adapter_weights"][0] == 0.5)
    start = _scales(run)

    def loss(at_half: bool) -> float:
        parts.generator.manual_seed(5)
        train_loop.use_adapter_weight(parts, batch if at_half else None)
        with torch.no_grad():
            return train_loop.micro_step_loss(parts, batch).item()

    full, half = loss(False), loss(True)
    assert _scales(run) == [0.5 * s for s in start]
    train_loop.use_adapter_weight(parts, None)
    assert _scales(run) == start
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.mul_(0.5)
    halved_b = loss(False)
    assert half == pytest.approx(halved_b, rel=1e-5) and abs(half - full) > 1e-3 * full


def test_fit_trains_each_batch_at_its_weight_and_ends_at_one(dial_run):
    run, parts = dial_run, dial_run.parts
    start, seen = _scales(run), []

    class Hooks:
        def after_step(self, step, loss, lr, grad_norm=None):
            seen.append(_scales(run) == start)  # what samples and checkpoints see after each step

        def should_stop(self):
            return False

    during = []
    handle = parts.unet.register_forward_pre_hook(lambda module, args: during.append(_scales(run)[0] / start[0]))
    try:
        batches = iter(run.data_loader(0))
        expected = []

        def recorded():
            for batch in batches:
                expected.append(float(batch["adapter_weights"][0]))
                yield batch

        train_loop.fit(parts, recorded(), 0, 6, Hooks())
    finally:
        handle.remove()
    assert during == pytest.approx(expected) and {0.5, 1.0} <= set(expected)
    assert seen == [True] * 6


@pytest.mark.parametrize("override, message", [
    ("data.sources=[{path: DIAL, adapter_weight: 0}]", "0 trains nothing"),
    ("data.sources=[{path: DIAL}, {path: CLASS, regularization: true, adapter_weight: 0.5}]",
     r"data.sources\[1\].adapter_weight: regularization images are trained at weight 1.0"),
    ("data.sources=[{path: DIAL, adapter_weight: .nan}]", "adapter_weight"),
    ("data.sources=[{path: DIAL, adapter_weight: 100}]", "adapter_weight"),
])
def test_bad_adapter_weights_get_one_line(tmp_path, override, message):
    dial, klass = _dial_dataset(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override.replace("DIAL", str(dial)).replace("CLASS", str(klass))])


def test_a_weight_in_a_regularization_folder_names_the_folder(tmp_path):
    dial, klass = _dial_dataset(tmp_path)
    (klass / "dataset.toml").write_text("adapter_weight = 0.5\n")
    config = load_config(None, [f"data.sources=[{{path: {dial}}}, {{path: {klass}, regularization: true}}]"])
    with pytest.raises(DatasetError, match=f"{klass} sets adapter_weight 0.5 in its dataset file"):
        check(config.data)

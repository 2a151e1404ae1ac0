"""Validation loss: a held-out set, scored at fixed noise and timesteps, that never trains and never changes what
the run trains."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_shapes_dataset
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.data import DatasetError, preflight
from sdlora.formats import read_adapter
from sdlora.training.run import TrainingRun
from sdlora.training.validation import HeldOut, Validator, split


def _log(run: TrainingRun) -> list[dict]:
    return [json.loads(line) for line in run.folder.step_log.read_text().splitlines()]


def _val(run: TrainingRun) -> dict[int, float]:
    return {row["step"]: row["val_loss"] for row in _log(run) if "val_loss" in row}


def test_a_fraction_is_held_out_by_seed_and_never_trained_on(make_config):
    config = make_config("validation.fraction=0.25")
    report = preflight.check(config.data)
    held = split(config, report)
    assert len(held.records) == 2 and len(held.train_records) == 6
    assert not {r.content_hash for r in held.records} & {r.content_hash for r in held.train_records}
    # The choice depends on the seed and the images only: a reversed folder order holds out the same images.
    reversed_report = preflight.check(config.data)
    reversed_report.records.reverse()
    reversed_report.buckets.reverse()
    assert {r.path for r in split(config, reversed_report).records} == {r.path for r in held.records}
    others = [{r.path for r in split(make_config("validation.fraction=0.25", f"validation.seed={seed}"),
                                     report).records} for seed in range(1, 6)]
    assert any(choice != {r.path for r in held.records} for choice in others)


def test_a_run_trains_only_on_what_is_not_held_out(make_config):
    run = TrainingRun(make_config("validation.fraction=0.25"))
    run.dataset = run._check_dataset()
    trained = {r.content_hash for r in run.dataset.records}
    assert len(trained) == 6 and not trained & {r.content_hash for r in run.held_out.records}


def test_a_validation_folder_sharing_a_training_image_is_refused(make_config, style_dataset, tmp_path):
    folder = tmp_path / "held-out"
    folder.mkdir()
    shutil.copy(style_dataset / "003.png", folder / "copy.png")
    with pytest.raises(DatasetError, match=r"validation.path: .*copy.png is the same image as the training image"):
        split(make_config(f"validation.path={folder}"), preflight.check(make_config().data))


def test_validation_is_reproducible_resumable_and_changes_nothing_it_watches(make_config, tmp_path):
    held_out = write_shapes_dataset(tmp_path / "held-out", 2, seed=7)
    common = [f"validation.path={held_out}", "validation.every=2", "validation.keep_best=true", "train.steps=4",
              "train.checkpoint_every=2",
              "train.keep_checkpoints=5", "lora.dropout=0.1", "data.random_flip=true", "train.noise_offset=0.05"]

    def run(name: str, *extra: str, steps: int | None = None, resume: str | None = None) -> TrainingRun:
        training = TrainingRun(make_config(*extra, f"output.dir={tmp_path / name}"))
        training.build()
        if steps is not None:  # stop early: the same as a run killed after its checkpoint at this step
            training.config = training.config.model_copy(
                update={"train": training.config.train.model_copy(update={"steps": steps})})
        training.result = training.fit(resume)
        return training

    first, second = run("first", *common), run("second", *common)
    assert sorted(_val(first)) == [2, 4]
    assert _val(first) == _val(second)  # bit-identical numbers from the same seed
    assert _val(first)[2] != _val(first)[4]  # and they move with the weights

    # Killed after step 3 (its checkpoint at step 2), resumed from step 2: the same numbers.
    run("resumed", *common, steps=3)
    resumed = run("resumed", *common, resume=str(tmp_path / "resumed" / "checkpoints" / "step-000002"))
    assert _val(resumed) == _val(first)
    assert [row["loss"] for row in _log(resumed)] == [row["loss"] for row in _log(first)]

    # keep_best: the adapter of the lowest-scoring step (as its checkpoint holds it), the same after the resume.
    best_step = min(_val(first), key=_val(first).get)
    best = read_adapter(first.folder.adapter("pytorch_lora_weights_best"))
    assert best.metadata["sdlora.step"] == str(best_step)
    weights = load_file(first.folder.checkpoints / f"step-{best_step:06d}" / "trainable.safetensors")
    assert all(torch.equal(t, weights[f"unet.{k.removesuffix('.weight')}.default.weight"])
               for k, t in best.tensors["unet"].items())
    before, after = (load_file(r.folder.adapter("pytorch_lora_weights_best")) for r in (first, resumed))
    assert before.keys() == after.keys() and all(torch.equal(t, after[k]) for k, t in before.items())

    # Without validation the run trains exactly the same weights, step for step.
    plain = run("plain", *[c for c in common if not c.startswith("validation.")])
    assert [row["loss"] for row in _log(plain)] == [row["loss"] for row in _log(first)]
    a, b = read_adapter(first.result.adapter_path).tensors, read_adapter(plain.result.adapter_path).tensors
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])


def test_overfitting_shows_as_a_rising_validation_loss(tmp_path):
    """Two images at a high learning rate on the trained shapes base: the loss on those two images falls while the
    loss on other images of the same world rises."""
    trained = write_shapes_dataset(tmp_path / "two", 2, seed=1)
    held_out = write_shapes_dataset(tmp_path / "held", 2, seed=2)
    config = load_config(None, [
        "model.base=sdlora:shapes", f"data.path={trained}", "data.resolution=64", "train.steps=16",
        "train.batch_size=2", "train.learning_rate=1e-2", "lora.rank=16", f"output.dir={tmp_path / 'run'}",
        f"validation.path={held_out}", "validation.every=8", "validation.timesteps=2",
    ])
    run = TrainingRun(config)
    run.build()
    on_training_images = Validator.prepare(config, HeldOut([], [], run.records, run.held_out.train_buckets), run.parts)
    train_before, val_before = on_training_images.score(run.parts), run.monitor.validator.score(run.parts)
    run.fit()
    train_after = on_training_images.score(run.parts)
    # Measured: training images 0.142 -> 0.089; held-out 0.044 -> 0.055 (step 8) -> 0.062 (step 16).
    assert train_after < 0.8 * train_before
    assert val_before < _val(run)[8] < _val(run)[16]
    assert _val(run)[16] == run.monitor.validator.score(run.parts)  # the logged number is the set's score


def test_sdxl_validation_with_both_caches_and_released_encoders(tiny_sdxl_base, style_dataset, tmp_path):
    """SDXL's pooled embedding and size conditioning reach the held-out score, and a fully cached run (its VAE
    encoder and text encoders freed after caching) still scores: images and captions were encoded at setup."""
    config = load_config(None, [
        f"model.base={tiny_sdxl_base}", f"data.path={style_dataset}", "data.resolution=64", "train.steps=2",
        "train.batch_size=2", f"output.dir={tmp_path / 'run'}", "data.cache_latents=true",
        "data.cache_text_embeddings=true", "validation.fraction=0.25", "validation.every=1", "validation.timesteps=2",
    ])
    run = TrainingRun(config)
    run.build()
    assert run.released  # the encoders really are gone
    run.fit()
    scores = _val(run)
    assert sorted(scores) == [1, 2] and scores[1] != scores[2]
    assert all(0 < value < 10 for value in scores.values())


def test_keep_best_writes_only_when_the_validation_loss_improves(make_config, tmp_path):
    from types import SimpleNamespace

    from sdlora.training.folder import RunFolder
    from sdlora.training.monitor import Monitor

    monitor = Monitor(make_config("validation.fraction=0.25", "validation.keep_best=true"), RunFolder(tmp_path),
                      SimpleNamespace(is_main_process=False))
    made = []
    components: dict = {}
    monitor.attach(None, HeldOut([], [], [], []), {}, components, lambda: made.append(1))
    for step, loss in enumerate([3.0, 2.0, 2.5, 2.0, 1.0], start=1):
        monitor._keep_if_best(step, loss)
    assert len(made) == 3 and (monitor.best.loss, monitor.best.step) == (1.0, 5)
    assert components["best_validation"].state_dict() == {"loss": 1.0, "step": 5}


def _sources_config(tmp_path, tiny_base, sources: str, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{base: {tiny_base}}}\ndata:\n  resolution: 64\n  sources:\n{sources}", encoding="utf-8")
    return load_config(path, ["train.steps=4", "train.batch_size=2", f"output.dir={tmp_path / 'run'}", *overrides])


def test_a_source_marked_for_validation_is_scored_and_never_trained_on(tiny_base, style_dataset, tmp_path):
    held = write_shapes_dataset(tmp_path / "held", 3, seed=5)
    config = _sources_config(tmp_path, tiny_base, f"    - {{path: {style_dataset}}}\n"
                             f"    - {{path: {held}, validation: true}}\n", "validation.every=2")
    run = TrainingRun(config)
    run.build()
    seen: list = []
    loader = run.data_loader

    def recording(start):  # every batch the loop takes, by the record each item came from
        for batch in loader(start):
            seen.extend(run.dataset.records[i].path for i in batch["indices"].tolist())
            yield batch

    run.data_loader = recording
    run.fit()
    held_paths = set(held.glob("*.png"))
    assert len(seen) == 4 * 2 and not held_paths & set(seen)  # four steps of two, none from the held-out source
    assert not held_paths & {r.path for r in run.dataset.records}
    assert {r.path for r in run.held_out.records} == held_paths  # the scored set is exactly that source
    assert len(run.monitor.validator.items) == 3 and sorted(_val(run)) == [2, 4]


def test_a_validation_source_is_refused_beside_the_other_held_out_sets(tiny_base, style_dataset, tmp_path):
    from sdlora.config import ConfigError

    held = write_shapes_dataset(tmp_path / "held", 2, seed=5)
    marked = f"    - {{path: {style_dataset}}}\n    - {{path: {held}, validation: true}}\n"
    for option in (f"validation.path={held}", "validation.fraction=0.25"):
        field = option.split("=")[0]
        with pytest.raises(ConfigError, match=rf"data.sources\[1\].validation cannot be combined with {field}"):
            _sources_config(tmp_path, tiny_base, marked, option)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].regularization cannot be combined with "
                                          r"data.sources\[1\].validation"):
        _sources_config(tmp_path, tiny_base, f"    - {{path: {style_dataset}}}\n"
                        f"    - {{path: {held}, validation: true, regularization: true}}\n")
    with pytest.raises(ConfigError, match="every source has regularization: true or validation: true"):
        _sources_config(tmp_path, tiny_base, f"    - {{path: {held}, validation: true}}\n")
    with pytest.raises(ConfigError, match="validation.every needs a held-out set: .* or validation: true on a "
                                          r"data.sources entry"):
        _sources_config(tmp_path, tiny_base, f"    - {{path: {style_dataset}}}\n", "validation.every=2")
    # A held-out source sharing an image with the training sources is refused, naming the source.
    shutil.copy(style_dataset / "003.png", held / "copy.png")
    config = _sources_config(tmp_path, tiny_base, marked)
    with pytest.raises(DatasetError, match=r"data.sources\[1\]: .*copy.png is the same image as the training image"):
        split(config, preflight.check(config.data))

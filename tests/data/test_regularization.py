"""Regularization sources: mixed in at the set ratio every epoch, rotating through the class images, and only
their loss scaled by the prior loss weight."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import write_shapes_dataset
from PIL import Image

from sdlora.config import CaptionSection, ConfigError, SourceSection, load_config
from sdlora.data import CaptionedImageDataset
from sdlora.data.buckets import BucketBatchSampler
from sdlora.data.loader import training_loader
from sdlora.data.sources import scan_sources


def _records(tmp_path, subject: int = 6, repeats: int = 2, klass: int = 10, weight: float = 1.0):
    subject_dir = write_shapes_dataset(tmp_path / "subject", subject, seed=1)
    class_dir = write_shapes_dataset(tmp_path / "class", klass, seed=2)
    return scan_sources([
        SourceSection(path=subject_dir, repeats=repeats),
        SourceSection(path=class_dir, regularization=True, loss_weight=weight,
                      captions=CaptionSection(prefix="class image")),
    ]).records


def test_the_batch_mix_matches_the_ratio_over_every_epoch(tmp_path):
    records = _records(tmp_path)  # 6 subject images x 2 repeats = 12 training items
    dataset = CaptionedImageDataset(records, 64, seed=3, regularization_ratio=0.25)
    assert len(dataset) == 16  # 12 training items + round(12 * 0.25 / 0.75) = 4 regularization slots
    loader = training_loader(dataset, bucketed=False, batch_size=4, seed=3, start=0, num_workers=0,
                             num_replicas=1, rank=0, device=torch.device("cpu"))
    batches = iter(loader)
    shown = Counter()
    for epoch in range(5):
        captions = [c for _ in range(4) for c in next(batches)["captions"]]
        regularization = [c for c in captions if c.startswith("class image")]
        assert len(regularization) == 4 and len(captions) == 16, epoch  # 25 % of the epoch, exactly
        shown.update(regularization)
    # 5 epochs x 4 slots = 20 = each of the 10 class images twice: the whole folder is used, none favoured.
    class_captions = Counter(f"class image, {r.caption}" for r in records if r.regularization)
    assert shown == Counter({caption: 2 * n for caption, n in class_captions.items()})


def test_a_bucketed_mix_keeps_the_ratio_and_each_slot_its_bucket(tmp_path):
    records = _records(tmp_path, subject=4, repeats=1, klass=6)
    # Two shapes of class images (and subject images): slots are spread over the buckets as the images are.
    wide, square = (64, 96), (64, 64)
    buckets = [wide if i % 2 else square for i in range(len(records))]
    dataset = CaptionedImageDataset(records, 64, seed=5, regularization_ratio=0.5, buckets=buckets)
    sampler = BucketBatchSampler(dataset.item_buckets(), 2, seed=5)
    for epoch in range(3):
        keys = [key for step in range(sampler.batches_per_epoch)
                for key in sampler.batch_at(epoch * sampler.batches_per_epoch + step)]
        chosen = [dataset.record_index(e, item) for e, item in keys]
        assert sum(records[r].regularization for r in chosen) == len(chosen) // 2
        for (e, item), record in zip(keys, chosen):
            assert buckets[record] == dataset.item_buckets()[item]


def test_the_prior_loss_weight_scales_only_regularization_samples(tmp_path):
    records = _records(tmp_path, weight=2.0)
    dataset = CaptionedImageDataset(records, 64, seed=3, prior_loss_weight=0.25)
    weights = {dataset.records[dataset.record_index(0, i)].regularization: dataset[(0, i)]["loss_weight"]
               for i in range(len(dataset))}
    assert weights == {False: 1.0, True: 2.0 * 0.25}  # the source's own weight times the prior weight


def test_without_regularization_sources_the_items_are_as_before(tmp_path):
    records = [replace(r, regularization=False) for r in _records(tmp_path, klass=2)]
    dataset = CaptionedImageDataset(records, 64, seed=3, regularization_ratio=0.9, prior_loss_weight=5.0)
    assert dataset.items == [r for r, record in enumerate(records) for _ in range(record.repeats)]
    assert len(dataset) == len(dataset.items) and {dataset[(0, i)]["loss_weight"] for i in range(3)} == {1.0}


def test_only_regularization_sources_is_refused_at_load(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"data\.sources: every source has regularization: true"):
        load_config(None, [f"data.sources=[{{path: {tmp_path}, regularization: true}}]"])


def test_the_dataset_check_counts_an_epoch_as_training_runs_it(tmp_path):
    from sdlora.config import DataSection
    from sdlora.data import preflight

    records = _records(tmp_path)  # 12 training items, 10 class images
    data = DataSection(resolution=64, sources=[
        SourceSection(path=tmp_path / "subject", repeats=2),
        SourceSection(path=tmp_path / "class", regularization=True)],
        regularization={"ratio": 0.25})
    report = preflight.check(data, batch_size=4)
    dataset = CaptionedImageDataset(report.records, 64, regularization_ratio=0.25)
    assert report.items_per_epoch == len(dataset) == 16 and report.batches_per_epoch == 4
    assert len(records) == len(report.records)

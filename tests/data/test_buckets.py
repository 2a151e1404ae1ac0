"""Acceptance 2: bucket assignment and bucketed batches."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from sdlora.data import BucketBatchSampler, assign_bucket, make_buckets

RES, STEP = 512, 64


@pytest.fixture(scope="module")
def buckets():
    return make_buckets(RES, STEP, min_side=256, max_side=1024, max_aspect=3.0)


def test_buckets_respect_budget_step_sides_and_aspect(buckets):
    assert (512, 512) in buckets
    assert len(buckets) >= 7 and len(set(buckets)) == len(buckets)
    for height, width in buckets:
        assert height * width <= RES * RES
        assert height % STEP == 0 and width % STEP == 0
        assert 256 <= height <= 1024 and 256 <= width <= 1024
        assert max(height / width, width / height) <= 3.0
    assert {(h, w) for h, w in buckets} == {(w, h) for h, w in buckets}  # portrait mirrors landscape


def test_every_image_goes_to_its_nearest_aspect_bucket(buckets):
    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(300, 3000), rng.randint(300, 3000))
        bucket = assign_bucket(size, buckets, STEP, upscale=True)
        distance = abs(math.log(bucket[1] / bucket[0]) - math.log(size[1] / size[0]))
        best = min(abs(math.log(w / h) - math.log(size[1] / size[0])) for h, w in buckets)
        assert bucket in buckets and distance <= best + 1e-9, (size, bucket)
    assert assign_bucket((1000, 5000), buckets, STEP, upscale=True) == max(buckets, key=lambda b: b[1] / b[0])


def test_without_upscale_small_images_get_a_bucket_inside_them(buckets):
    rng = random.Random(1)
    for _ in range(300):
        size = (rng.randint(64, 700), rng.randint(64, 700))
        bucket = assign_bucket(size, buckets, STEP, upscale=False)
        assert bucket is not None and bucket[0] <= size[0] and bucket[1] <= size[1], (size, bucket)
        assert bucket[0] % STEP == 0 and bucket[1] % STEP == 0 and bucket[0] * bucket[1] <= RES * RES
    assert assign_bucket((2000, 2000), buckets, STEP, upscale=False) == (512, 512)
    assert assign_bucket((40, 900), buckets, STEP, upscale=False) is None  # too small for a 64 px side


def _stream(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def _items(seed=0, count=37):
    rng = random.Random(seed)
    shapes = [(512, 512), (384, 640), (640, 384), (320, 768)]
    return [rng.choice(shapes) for _ in range(count)]


def test_batches_never_mix_buckets_and_cover_every_item():
    bucket_of = _items()
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=3)
    per_bucket = Counter(bucket_of)
    assert sampler.batches_per_epoch == sum(math.ceil(n / 4) for n in per_bucket.values())
    epoch = _stream(sampler, sampler.batches_per_epoch)
    for batch in epoch:
        assert len(batch) == 4 and len({bucket_of[i] for _, i in batch}) == 1
        assert {e for e, _ in batch} == {0}
    assert {i for batch in epoch for _, i in batch} == set(range(len(bucket_of)))
    assert _stream(sampler, sampler.batches_per_epoch + 1)[-1][0][0] == 1  # next batch starts epoch 1


def test_order_is_reproducible_from_the_seed_and_resumable():
    bucket_of = _items()
    first = _stream(BucketBatchSampler(bucket_of, 3, seed=7), 30)
    assert first == _stream(BucketBatchSampler(bucket_of, 3, seed=7), 30)
    assert first != _stream(BucketBatchSampler(bucket_of, 3, seed=8), 30)
    assert _stream(BucketBatchSampler(bucket_of, 3, seed=7, start=17), 13) == first[17:]
    assert first[:13] != first[13:26]  # epochs are shuffled differently


def test_replicas_split_each_global_batch():
    bucket_of = _items(count=40)
    whole = _stream(BucketBatchSampler(bucket_of, 4, seed=2), 12)
    ranks = [_stream(BucketBatchSampler(bucket_of, 2, seed=2, num_replicas=2, rank=r), 12) for r in (0, 1)]
    for step in range(12):
        assert ranks[0][step] + ranks[1][step] == whole[step]

"""The SVD maths behind resize, convert --to lora, extract and merge --rank (`formats.lowrank`), on small tensors."""

from __future__ import annotations

import pytest
import torch

from sdlora.formats import lowrank


def _product(factors: lowrank.Factors) -> torch.Tensor:
    return factors.up.reshape(factors.up.shape[0], -1).double() @ factors.down.reshape(factors.rank, -1).double()


def test_the_reported_error_is_the_measured_one_and_the_best_possible():
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    for rank in (1, 5, 24):
        factors = lowrank.factorize(delta, rank)
        measured = float((delta.double() - _product(factors)).norm() / delta.double().norm())
        singular = torch.linalg.svdvals(delta.double())
        assert factors.rank == rank
        assert factors.error == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert measured == pytest.approx(float(singular[rank:].norm() / singular.norm()), rel=1e-4, abs=1e-6)


def test_a_target_error_gets_the_smallest_rank_that_reaches_it():
    singular = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25])
    total = float(singular.pow(2).sum().sqrt())
    for k in range(1, 5):
        reached = float(singular[k:].norm()) / total
        assert lowrank.rank_for_error(singular, reached) == k
        assert lowrank.rank_for_error(singular, reached * 0.999) == k + 1
    assert lowrank.rank_for_error(torch.zeros(3), 0.1) == 1  # a zero update keeps one (zero) rank


def test_conv_kernels_keep_their_shape_and_a_low_rank_conv_comes_back_exactly():
    generator = torch.Generator().manual_seed(1)
    delta = (torch.randn(16, 3, generator=generator) @ torch.randn(3, 8 * 9, generator=generator)).reshape(16, 8, 3, 3)
    factors = lowrank.factorize(delta, 3)
    assert factors.down.shape == (3, 8, 3, 3) and factors.up.shape == (16, 3, 1, 1)
    assert factors.error < 1e-5 and torch.allclose(_product(factors).float().reshape(delta.shape), delta, atol=1e-4)


def test_factors_of_a_product_equal_factors_of_the_full_matrix():
    generator = torch.Generator().manual_seed(2)
    down, up = torch.randn(8, 30, generator=generator), torch.randn(20, 8, generator=generator)
    from_product = lowrank.factorize_product(down, up, 0.5, rank=3)
    from_matrix = lowrank.factorize(0.5 * up @ down, rank=3)
    assert from_product.error == pytest.approx(from_matrix.error, rel=1e-5)
    assert torch.allclose(_product(from_product), _product(from_matrix), atol=1e-4)


def test_clamping_reports_the_error_it_adds():
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(32, 32, generator=generator) ** 3  # heavy tails: clamping at the 0.9 quantile bites
    exact, clamped = lowrank.factorize(delta, 8), lowrank.factorize(delta, 8, clamp_quantile=0.9)
    measured = float((delta.double() - _product(clamped)).norm() / delta.double().norm())
    assert clamped.error == pytest.approx(measured, rel=1e-4) and clamped.error > exact.error


def test_overall_error_weighs_layers_by_their_size():
    big = lowrank.Factors(torch.zeros(1, 1), torch.zeros(1, 1), norm=10.0, residual=1.0)
    small = lowrank.Factors(torch.zeros(1, 1), torch.zeros(1, 1), norm=1.0, residual=1.0)
    assert lowrank.overall_error([big, small]) == pytest.approx((2 / 101) ** 0.5)

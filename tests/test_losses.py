import math

import pytest
import torch

from erasure.losses import chi2, hellinger, mse, per_sample_mse


@pytest.fixture
def pair():
    """Sample 0 differs by 2 in every element (m = 4), sample 1 not at all (m = 0)."""
    target = torch.zeros(2, 4, 8, 8)
    prediction = target.clone()
    prediction[0] += 2.0
    return prediction, target


def test_per_sample_mean_not_sum(pair):
    assert per_sample_mse(*pair).tolist() == [4.0, 0.0]


def test_mse_by_hand(pair):
    assert mse(*pair).item() == pytest.approx(2.0)


def test_hellinger_by_hand(pair):
    assert hellinger(*pair).item() == pytest.approx((-math.exp(-4 / 8) - 1) / 2)
    assert hellinger(*pair, sigma=2.0).item() == pytest.approx((-math.exp(-4 / 32) - 1) / 2)


def test_chi2_by_hand(pair):
    assert chi2(*pair).item() == pytest.approx((math.exp(4) + 1) / 2)
    assert chi2(*pair, sigma=2.0).item() == pytest.approx((math.exp(1) + 1) / 2)


def test_losses_stay_finite_and_informative_on_sd_sized_latents():
    """With a per-element sum these would vanish (Hellinger) or overflow (chi2)."""
    prediction = torch.randn(2, 4, 64, 64, requires_grad=True)
    target = torch.randn(2, 4, 64, 64)
    for loss in (mse, hellinger, chi2):
        value = loss(prediction, target)
        (gradient,) = torch.autograd.grad(value, prediction)
        assert torch.isfinite(value) and gradient.abs().sum() > 1e-6, loss.__name__


def test_all_losses_are_minimised_at_the_target():
    target = torch.randn(3, 4, 4, 4)
    for loss in (mse, hellinger, chi2):
        assert loss(target, target) < loss(target + 0.1, target), loss.__name__

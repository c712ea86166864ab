"""The loss functions, against hand computations."""

import math
from types import SimpleNamespace

import pytest
import torch

from sparsefusion.losses import huber, kl_to_standard_normal, mean_huber, opacity_term, weighted_l1


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    small, large = torch.tensor(1e-3), torch.tensor(5.0)
    assert torch.allclose(huber(small, torch.tensor(0.0)), small ** 2 / (2 * 0.1), rtol=1e-3)
    assert torch.allclose(huber(large, torch.tensor(0.0)), large - 0.1, rtol=1e-3)
    assert mean_huber(torch.tensor([5.0, 0.0]), torch.zeros(2)).item() == pytest.approx((5 - 0.1) / 2, rel=1e-3)


def test_opacity_term_is_smallest_for_empty_silhouettes():
    assert opacity_term(torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.1)
    assert opacity_term(torch.ones(1, 1, 4, 4)).item() == pytest.approx(math.sqrt(1.01))


def test_weighted_l1_weighs_each_image_by_its_own_noise_level():
    images, targets = torch.zeros(2, 3, 4, 4), torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.25)])
    assert weighted_l1(images, targets, torch.tensor([0.2, 1.0])).item() == pytest.approx((0.2 * 0.5 + 0.25) / 2)


def test_kl_to_standard_normal_sums_over_latents_per_image():
    mean = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)])
    logvar = torch.stack([torch.zeros(4, 2, 2), torch.full((4, 2, 2), math.log(2.0))])
    posterior = SimpleNamespace(mean=mean, logvar=logvar, std=torch.exp(0.5 * logvar))
    per_latent = 0.5 * (1 + 2 - 1 - math.log(2.0))
    assert kl_to_standard_normal(posterior).tolist() == pytest.approx([0.0, 16 * per_latent])

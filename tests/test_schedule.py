"""The cosine log-SNR schedule and the Gaussian diffusion identities, checked in float64 against closed forms."""

import math

import pytest
import torch

from sparsefusion.schedule import (COSINE_S, alpha_sigma, cosine_log_snr, p2_loss_weight, predict_start_from_noise,
                                   q_posterior, q_sample, random_times, sampling_times, truncated_steps)


def test_alpha_bar_is_cosine_squared():
    t = torch.linspace(0, 0.99, 100, dtype=torch.float64)
    log_snr = cosine_log_snr(t)
    alpha, sigma = alpha_sigma(log_snr)
    expected = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    torch.testing.assert_close(alpha ** 2, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    torch.testing.assert_close(torch.log(alpha ** 2 / sigma ** 2), log_snr)
    assert (log_snr[1:] < log_snr[:-1]).all()


def test_log_snr_is_clamped_where_the_noise_vanishes():
    # At t = -s the cosine is 1: upstream clamps cos⁻² - 1 at 1e-5, so λ stops at -log(1e-5).
    log_snr = cosine_log_snr(torch.tensor([-COSINE_S], dtype=torch.float64))
    torch.testing.assert_close(log_snr, torch.tensor([-math.log(1e-5)], dtype=torch.float64))


def test_q_sample_and_predict_start_from_noise_invert_each_other():
    x0 = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    log_snr = torch.tensor([-8.0, -2.0, 0.0, 3.0, 9.0], dtype=torch.float64)
    x_t = q_sample(x0, log_snr, noise)
    alpha, sigma = torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()
    torch.testing.assert_close(x_t, alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise)
    torch.testing.assert_close(predict_start_from_noise(x_t, log_snr, noise), x0, rtol=1e-9, atol=1e-9)


def test_q_posterior_matches_its_closed_form():
    # q(x_s | x_t, x_0) for the variance-preserving process (Kingma et al. 2021, eq. 3):
    # α_t|s = α_t/α_s, σ²_t|s = σ_t² − α²_t|s σ_s²,
    # mean = α_t|s σ_s²/σ_t² x_t + α_s σ²_t|s/σ_t² x_0, variance = σ²_t|s σ_s² / σ_t².
    x0, x_t = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.4, 0.05], dtype=torch.float64)
    s = t - torch.tensor([0.02, 0.3, 0.1, 0.05], dtype=torch.float64)
    a2_t, a2_s = [torch.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2 for u in (t, s)]
    s2_t, s2_s = 1 - a2_t, 1 - a2_s
    a_ts = (a2_t / a2_s).sqrt()
    s2_ts = s2_t - a_ts ** 2 * s2_s
    per_image = (slice(None), None, None, None)
    expected_mean = (a_ts * s2_s / s2_t)[per_image] * x_t + (a2_s.sqrt() * s2_ts / s2_t)[per_image] * x0
    expected_variance = s2_ts * s2_s / s2_t

    mean, variance, log_variance = q_posterior(x0, x_t, cosine_log_snr(t), cosine_log_snr(s))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(variance.flatten(), expected_variance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_variance.flatten(), expected_variance.log(), rtol=1e-9, atol=1e-9)


def test_q_posterior_log_variance_is_floored():
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    _, variance, log_variance = q_posterior(x, x, torch.tensor([2.0], dtype=torch.float64),
                                            torch.tensor([2.0], dtype=torch.float64))
    assert variance.item() == 0
    assert log_variance.item() == pytest.approx(math.log(1e-20))


def test_p2_weight_with_upstream_settings_is_sigma():
    # (1 + e^λ)^(-1/2) = σ, since σ² = 1 / (1 + e^λ).
    log_snr = torch.linspace(-10, 10, 21, dtype=torch.float64)
    torch.testing.assert_close(p2_loss_weight(log_snr, gamma=0.5, k=1.0), alpha_sigma(log_snr)[1])
    torch.testing.assert_close(p2_loss_weight(log_snr, gamma=0.0), torch.ones_like(log_snr))


def test_sampling_times_are_descending_pairs_ending_at_zero():
    times = sampling_times(50)
    assert times.shape == (51,) and times.dtype == torch.float32
    assert times[0].item() == 1.0 and times[-1].item() == 0.0
    torch.testing.assert_close(times[:-1] - times[1:], torch.full((50,), 0.02))
    truncated = sampling_times(5, start=0.3)
    assert truncated[0].item() == pytest.approx(0.3) and truncated[-1].item() == 0.0 and len(truncated) == 6


@pytest.mark.parametrize("max_thres, steps", [(0.5, 50), (0.99, 50), (0.25, 25), (0.1, 10), (0.004, 0), (0.29, 28)])
def test_truncated_steps_round_as_python_floats(max_thres, steps):
    # 0.29 · 50 · 2 = 28.999999999999996 in Python floats, so upstream runs 28 steps.
    assert truncated_steps(max_thres, 50) == steps


def test_random_times_draw_upstreams_uniforms():
    torch.manual_seed(3)
    times = random_times(6)
    torch.manual_seed(3)
    torch.testing.assert_close(times, torch.zeros(6).uniform_(0, 0.999))
    assert ((times >= 0) & (times < 0.999)).all()


@pytest.mark.parametrize("scenes", [1, 3, 8])
def test_expected_unet_calls_of_scenes_sharing_them_match_a_monte_carlo_draw(scenes):
    """benchmarks/bench_vldm.py's expectation, which the benchmark corrects its few timed iterations to: per
    guided step, the most UNet calls any of the scenes needs (n + 1 for n PLMS steps from t ~ U[0, 0.99])."""
    from benchmarks.bench_vldm import distillation_unet_calls

    generator = torch.Generator().manual_seed(scenes)
    times = (torch.rand(20000, scenes, generator=generator, dtype=torch.float64) * 0.99).tolist()
    draws = [max(truncated_steps(t) + 1 if truncated_steps(t) else 0 for t in step) for step in times]
    assert distillation_unet_calls(50, scenes) == pytest.approx(sum(draws) / len(draws), abs=0.25)
    assert distillation_unet_calls(50, 1) < distillation_unet_calls(50, 2) < distillation_unet_calls(50, 8) <= 51

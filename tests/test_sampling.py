"""PLMS and ancestral samplers: steps against hand computations, distributions against an exact ε-predictor."""

import math

import pytest
import torch

from sparsefusion.sampling import (denoise_plms_truncated, denoise_plms_truncated_grouped, plms_step, sample_ancestral,
                                   sample_plms, sample_plms_grouped)
from sparsefusion.schedule import COSINE_S, sampling_times, truncated_steps

F64 = torch.float64


def alpha_bar(t):
    """ᾱ(t) = cos²(π/2 · (t + s)/(1 + s)), the cosine schedule written out."""
    return math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


def log_snr(t):
    return math.log(alpha_bar(t) / (1 - alpha_bar(t)))


def reference_posterior_draw(x, eps, t, t_next, noise, clip=10.0):
    """x_next from q(x_next | x, x̂_0) in the closed form of Kingma et al. 2021, eq. 3 (scalar times)."""
    a2_t, a2_s = alpha_bar(t), alpha_bar(t_next)
    x0 = ((x - math.sqrt(1 - a2_t) * eps) / math.sqrt(a2_t)).clamp(-clip, clip)
    a2_ts = a2_t / a2_s
    s2_ts = (1 - a2_t) - a2_ts * (1 - a2_s)
    mean = math.sqrt(a2_ts) * (1 - a2_s) / (1 - a2_t) * x + math.sqrt(a2_s) * s2_ts / (1 - a2_t) * x0
    std = math.sqrt(s2_ts * (1 - a2_s) / (1 - a2_t))
    return mean + (std * noise if t_next > 0 else 0)


def draws(seed, shape, n, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(n)]


def times(t, batch=2):
    return torch.full((batch,), t, dtype=F64)


class Recorder:
    """A model returning fn(x, λ) and recording its inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, log_snr, cond):
        self.calls.append((x.clone(), log_snr.clone()))
        return self.fn(x, log_snr)


@pytest.mark.parametrize("n_old, weights", [
    (1, (3 / 2, -1 / 2)),
    (2, (23 / 12, -16 / 12, 5 / 12)),
    (3, (55 / 24, -59 / 24, 37 / 24, -9 / 24)),
    (5, (55 / 24, -59 / 24, 37 / 24, -9 / 24)),  # only the 3 latest count
])
def test_plms_step_is_adams_bashforth(n_old, weights):
    x, eps = torch.randn(2, 2, 4, 3, 3, dtype=F64)
    old_eps = list(torch.randn(n_old, 2, 4, 3, 3, dtype=F64))
    model = Recorder(lambda x, ls: eps)

    x_next, _, eps_out = plms_step(model, x, times(0.6), times(0.55), old_eps=old_eps,
                                   generator=torch.Generator().manual_seed(1))

    latest_first = [eps] + old_eps[::-1][:3]
    eps_prime = sum(w * e for w, e in zip(weights, latest_first))
    _, used = draws(1, x.shape, 2)  # upstream's draw after the model call is discarded
    torch.testing.assert_close(x_next, reference_posterior_draw(x, eps_prime, 0.6, 0.55, used))
    assert eps_out is eps and len(model.calls) == 1
    assert model.calls[0][1].tolist() == pytest.approx([log_snr(0.6)] * 2)


def test_first_plms_step_is_pseudo_improved_euler_with_four_draws():
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    model = Recorder(lambda x, ls: 0.3 * x + 0.1 * ls[:, None, None, None])
    generator = torch.Generator().manual_seed(2)

    x_next, _, _ = plms_step(model, x, times(0.8), times(0.7), generator=generator)

    _, n_mid, _, n_out, n_after = draws(2, x.shape, 5)
    eps = 0.3 * x + 0.1 * log_snr(0.8)
    x_mid = reference_posterior_draw(x, eps, 0.8, 0.7, n_mid)
    eps_mid = 0.3 * x_mid + 0.1 * log_snr(0.7)
    torch.testing.assert_close(x_next, reference_posterior_draw(x, (eps + eps_mid) / 2, 0.8, 0.7, n_out))
    assert len(model.calls) == 2
    torch.testing.assert_close(model.calls[1][0], x_mid)
    assert model.calls[1][1].tolist() == pytest.approx([log_snr(0.7)] * 2)
    torch.testing.assert_close(torch.randn(x.shape, generator=generator, dtype=F64), n_after)


def test_step_to_time_zero_adds_no_noise():
    x, eps = torch.randn(2, 2, 4, 3, 3, dtype=F64)
    outs = [plms_step(lambda *_: eps, x, times(0.1), times(0.0), old_eps=[eps],
                      generator=torch.Generator().manual_seed(seed))[0] for seed in (0, 1)]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], reference_posterior_draw(x, eps, 0.1, 0.0, None))


# An exact ε-predictor: data x_0 ~ N(μ, s²) elementwise gives x_t ~ N(αμ, α²s² + σ²) and
# E[ε | x_t] = σ (x_t − αμ) / (α²s² + σ²).
MU, STD = 0.5, 0.3


def gaussian_eps(x, log_snr_, cond=None):
    a2 = torch.sigmoid(log_snr_)[:, None, None, None]
    return (1 - a2).sqrt() * (x - a2.sqrt() * MU) / (a2 * STD ** 2 + 1 - a2)


def assert_gaussian(samples, std_tolerance):
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    assert samples.std().item() == pytest.approx(STD, rel=std_tolerance)


@pytest.mark.parametrize("sampler, steps, std_tolerance", [
    (sample_ancestral, 500, 0.03),
    (sample_plms, 50, 0.10),   # ancestral steps with x̂_0 plugged in lose variance; less with more steps
    (sample_plms, 200, 0.04),
])
def test_samplers_reproduce_a_gaussian_data_distribution(sampler, steps, std_tolerance):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1, 4, 4, dtype=F64, generator=generator)
    assert_gaussian(sampler(gaussian_eps, x, sampling_times(steps).double(), generator=generator), std_tolerance)


@pytest.mark.parametrize("max_thres", [0.3, 0.7])
def test_truncated_plms_returns_to_the_data_distribution(max_thres):
    generator = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(1000, 1, 4, 4, dtype=F64, generator=generator)
    x, _, _, _ = denoise_plms_truncated(gaussian_eps, x0, max_thres, generator=generator)
    assert_gaussian(x, 0.06)


def test_truncated_plms_noises_then_steps_with_upstreams_draws():
    x0 = torch.randn(2, 4, 3, 3)
    model = Recorder(lambda x, ls: torch.zeros_like(x))
    generator = torch.Generator().manual_seed(4)

    _, x_noisy, noise, alpha_bar_ = denoise_plms_truncated(model, x0, 0.3, generator=generator)

    n = truncated_steps(0.3)
    expected = draws(4, x0.shape, 1 + 4 + 2 * (n - 1) + 1, torch.float32)
    torch.testing.assert_close(noise, expected[0])
    torch.testing.assert_close(torch.randn(x0.shape, generator=generator), expected[-1])
    torch.testing.assert_close(alpha_bar_, torch.full((2,), alpha_bar(0.3)))
    torch.testing.assert_close(x_noisy, alpha_bar(0.3) ** 0.5 * x0 + (1 - alpha_bar(0.3)) ** 0.5 * noise)
    assert len(model.calls) == n + 1
    torch.testing.assert_close(model.calls[0][0], x_noisy)


@pytest.mark.parametrize("high_noise", ["upstream", "noised"])
def test_truncated_plms_from_high_noise(high_noise):
    x0 = torch.randn(1, 4, 3, 3)
    model = Recorder(lambda x, ls: torch.zeros_like(x))
    _, x_noisy, _, _ = denoise_plms_truncated(model, x0, 0.995, high_noise=high_noise)
    first_x, first_log_snr = model.calls[0]
    assert len(model.calls) == 51
    if high_noise == "upstream":  # upstream restarts at t = 1 from the clean latent
        torch.testing.assert_close(first_x, x0)
        assert first_log_snr.item() < -30
    else:
        torch.testing.assert_close(first_x, x_noisy)
        assert first_log_snr.item() == pytest.approx(log_snr(0.995), rel=1e-4)


def test_truncated_plms_below_one_step_returns_the_noised_latent():
    model = Recorder(lambda x, ls: torch.zeros_like(x))
    x, x_noisy, _, _ = denoise_plms_truncated(model, torch.randn(1, 4, 3, 3), 0.004)
    assert not model.calls
    torch.testing.assert_close(x, x_noisy)


def test_callbacks_see_every_step():
    seen = []
    sample_plms(lambda x, *_: torch.zeros_like(x), torch.randn(1, 4, 2, 2), sampling_times(7),
                callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(7))


def conditioned_eps(x, log_snr, cond):
    """A model whose ε̂ depends on every input, per row: x, its own λ and its own conditioning."""
    return torch.tanh(0.7 * x + 0.05 * log_snr.view(-1, 1, 1, 1) + cond[:, :1])


# 0.3: 30 steps; 0.995: upstream's restart, 50 steps from t = 1; 0.004: no step; 0.72: capped at 50; 0.17: 17
GROUP_LEVELS = [0.3, 0.995, 0.004, 0.72, 0.17]


@pytest.mark.parametrize("high_noise", ["upstream", "noised"])
def test_grouped_truncated_plms_gives_each_group_its_own_run(high_noise):
    """Each group's latents, draws and model inputs are its run alone; the runs share max n_g + 1 model calls."""
    rows, groups = 2, len(GROUP_LEVELS)
    x0 = torch.randn(groups * rows, 4, 3, 3, dtype=F64)
    cond = torch.randn(groups * rows, 2, 3, 3, dtype=F64)
    batch_sizes = []

    def counted(x, log_snr, c):
        batch_sizes.append(x.shape[0])
        return conditioned_eps(x, log_snr, c)

    generators = [torch.Generator().manual_seed(10 + g) for g in range(groups)]
    grouped = denoise_plms_truncated_grouped(counted, x0, GROUP_LEVELS, cond, generators=generators,
                                             high_noise=high_noise)
    for g, level in enumerate(GROUP_LEVELS):
        part = slice(g * rows, (g + 1) * rows)
        own = torch.Generator().manual_seed(10 + g)
        alone = denoise_plms_truncated(conditioned_eps, x0[part], level, cond[part], generator=own,
                                       high_noise=high_noise)
        for batched, single in zip(grouped, alone):  # float64, rows independent: equal to rounding
            torch.testing.assert_close(batched[part], single, rtol=1e-12, atol=1e-12)
        assert torch.equal(torch.randn(3, generator=generators[g]), torch.randn(3, generator=own))  # as many draws
    steps = [50 if level >= 0.99 and high_noise == "upstream" else truncated_steps(level) for level in GROUP_LEVELS]
    assert len(batch_sizes) == max(steps) + 1  # every group's first step (two calls) at global step 0
    assert batch_sizes[0] == batch_sizes[1] == rows * sum(n > 0 for n in steps)  # the improved-Euler pair
    assert batch_sizes[-1] == rows * sum(n == max(steps) for n in steps)  # the longest runs finish alone


def test_grouped_plms_of_one_group_is_sample_plms():
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    cond = torch.randn(3, 2, 2, 2, dtype=F64)
    grid = sampling_times(7).double()
    expected = sample_plms(conditioned_eps, x, grid, cond, generator=torch.Generator().manual_seed(1))
    got = sample_plms_grouped(conditioned_eps, x, [grid], cond, [torch.Generator().manual_seed(1)])
    assert torch.equal(got, expected)

"""Continuous-time Gaussian diffusion with the cosine schedule: pure functions of the noise level.

Symbols (Kingma et al. 2021, "Variational Diffusion Models", VDM; cosine schedule of Nichol &
Dhariwal 2021):

    t ∈ [0, 1]   time; 1 is pure noise
    λ            log-SNR, log(α²/σ²); the UNet's time input
    α, σ         signal and noise scales, α² + σ² = 1; ᾱ = α² = sigmoid(λ)
    x_t          α x_0 + σ ε,  ε ~ N(0, I)

Functions of the noise level take λ, (B,) or a scalar, and broadcast it over the batch of images.
"""

import math

import torch

COSINE_S = 0.008  # offset s of the cosine schedule


def cosine_log_snr(t, s=COSINE_S):
    """Return λ(t) = −log(cos⁻²(π/2 · (t + s)/(1 + s)) − 1), the shape of t.

    So ᾱ(t) = sigmoid(λ) = cos²(π/2 · (t + s)/(1 + s)), not renormalised by ᾱ(0); the argument of
    the log is clamped at 1e-5 (λ ≤ 11.5), as upstream does.
    """
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1).clamp(min=1e-5))


def alpha_sigma(log_snr):
    """Return (α, σ) = (√sigmoid(λ), √sigmoid(−λ)), each the shape of log_snr."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def per_image(value, x):
    """Return value (B,) or () viewed as (B, 1, …, 1) to broadcast against x (B, …)."""
    return value.view(*value.shape, *(1,) * (x.ndim - value.ndim)) if value.ndim else value


def q_sample(x0, log_snr, noise):
    """Return x_t = α x_0 + σ ε, (B, …): x0 noised to log-SNR λ (B,) with noise ε (B, …)."""
    alpha, sigma = alpha_sigma(per_image(log_snr, x0))
    return alpha * x0 + sigma * noise


def predict_start_from_noise(x_t, log_snr, eps):
    """Return x̂_0 = (x_t − σ ε̂) / α, (B, …), with α clamped at 1e-8."""
    alpha, sigma = alpha_sigma(per_image(log_snr, x_t))
    return (x_t - sigma * eps) / alpha.clamp(min=1e-8)


def q_posterior(x0, x_t, log_snr, log_snr_next):
    """Return (mean, variance, log_variance) of q(x_s | x_t, x_0) for λ_s = log_snr_next > λ_t = log_snr.

    With c = 1 − e^(λ_t − λ_s) (VDM appendix, near eq. 33):
    mean = α_s (x_t (1 − c) / α_t + c x_0), variance = σ_s² c; the log-variance is clamped at log 1e-20.
    Mean is (B, …); variance and log-variance are (B, 1, …, 1).
    """
    log_snr, log_snr_next = per_image(log_snr, x_t), per_image(log_snr_next, x_t)
    alpha, _ = alpha_sigma(log_snr)
    alpha_next, sigma_next = alpha_sigma(log_snr_next)
    c = -torch.expm1(log_snr - log_snr_next)
    mean = alpha_next * (x_t * (1 - c) / alpha + c * x0)
    variance = sigma_next ** 2 * c
    return mean, variance, torch.log(variance.clamp(min=1e-20))


def p2_loss_weight(log_snr, gamma=0.5, k=1.0):
    """Return the P2 loss weight (k + e^λ)^−γ (Choi et al. 2022, eq. 8), the shape of log_snr."""
    return (k + log_snr.exp()) ** -gamma


def sampling_times(steps, start=1.0, device=None):
    """Return the descending (steps + 1,) grid linspace(start, 0, steps + 1); step i goes from [i] to [i + 1]."""
    return torch.linspace(start, 0.0, steps + 1, device=device)


def truncated_steps(max_thres, plms_steps=50):
    """Return min(int(max_thres · plms_steps · 2), plms_steps): upstream's PLMS step count from time max_thres.

    Computed in Python floats as upstream does, so e.g. 0.29 gives 28 steps, not 29.
    """
    return min(int(max_thres * plms_steps * 2), plms_steps)


def random_times(batch, device=None, generator=None, max_time=0.999):
    """Return (B,) training times drawn uniformly from [0, max_time)."""
    return torch.empty(batch, device=device).uniform_(0, max_time, generator=generator)

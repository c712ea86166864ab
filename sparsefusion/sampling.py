"""Samplers of the VLDM: ancestral (DDPM) and upstream's PLMS, plus the truncated PLMS of the distillation.

Contract shared by all samplers:
    model(x, log_snr, cond) -> ε̂ (B, C, H, W), for x (B, C, H, W), log_snr (B,), cond (B, Cc, H, W) or None;
    timesteps: a descending (S + 1,) grid of times in [0, 1] (schedule.sampling_times); step i goes
        from timesteps[i] to timesteps[i + 1];
    generator: a torch.Generator on x's device, or None for the global generator. Draws happen in
        upstream's order, so with the global generator and upstream's seed the noise is upstream's.

Both samplers are ancestral: every step draws x_{t_next} from the posterior q(x_{t_next} | x_t, x̂_0),
with x̂_0 predicted from ε̂ and clamped to ±clip_value; the step that ends at t = 0 adds no noise.
The model is any callable (a compiled or CUDA-graphed UNet works); the loop itself has fixed
shapes and no host synchronisation.
"""

import torch
from tqdm import tqdm

from sparsefusion.config import check_choice
from sparsefusion.schedule import (cosine_log_snr, per_image, predict_start_from_noise, q_posterior, q_sample,
                                   sampling_times, truncated_steps)

# Adams–Bashforth weights on (ε_t, ε_{t-1}, …) by the number of earlier ε's, and their denominator
# (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eq. 12).
ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}

HIGH_NOISE_STARTS = ("upstream", "noised")


def randn_like(x, generator=None):
    """Return standard normal noise shaped like x (contiguous), drawn from generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def posterior_sample(x, eps, log_snr, log_snr_next, noise, noise_scale, clip_value=10.0):
    """Return (x_next, x̂_0), each (B, C, H, W): a draw from q(x_next | x, x̂_0) with x̂_0 from ε̂.

    noise_scale (B, 1, 1, 1) is 0 for a step that ends at t = 0, else 1.
    """
    x0 = predict_start_from_noise(x, log_snr, eps).clamp(-clip_value, clip_value)
    mean, _, log_variance = q_posterior(x0, x, log_snr, log_snr_next)
    return mean + noise_scale * (0.5 * log_variance).exp() * noise, x0


def _time_pairs(timesteps, x, progress):
    """Yield (i, t, t_next), each time (B,) on x's device."""
    timesteps = timesteps.to(x.device)
    batch = x.shape[0]
    for i in tqdm(range(len(timesteps) - 1), desc="sampling", disable=not progress):
        yield i, timesteps[i].expand(batch), timesteps[i + 1].expand(batch)


@torch.no_grad()
def sample_ancestral(model, x, timesteps, cond=None, callback=None, generator=None, clip_value=10.0,
                     progress=False):
    """Return x_0 (B, C, H, W), clamped to ±clip_value: DDPM ancestral sampling (Ho et al. 2020, Alg. 2) from x.

    callback, if given, gets {"i", "t", "x", "x0"} after every step.
    """
    for i, t, t_next in _time_pairs(timesteps, x, progress):
        log_snr, log_snr_next = cosine_log_snr(t), cosine_log_snr(t_next)
        eps = model(x, log_snr, cond)
        noise_scale = per_image((t_next != 0).to(x.dtype), x)
        x, x0 = posterior_sample(x, eps, log_snr, log_snr_next, randn_like(x, generator), noise_scale, clip_value)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x.clamp(-clip_value, clip_value)


@torch.no_grad()
def plms_step(model, x, t, t_next, cond=None, old_eps=(), generator=None, clip_value=10.0):
    """Return (x_next, x̂_0, ε̂_t), each (B, C, H, W): one step of upstream's PLMS sampler from t to t_next (B,).

    With no earlier ε's (old_eps, oldest first) the step is the pseudo improved Euler step: ε' is the
    mean of ε̂ at (x, t) and at a posterior draw x̃ at t_next (2 model calls); otherwise ε' is the
    Adams–Bashforth combination of ε̂_t and up to 3 earlier ε's. x_next is drawn from the posterior
    with ε'. Upstream draws a posterior noise after each model call and discards it; those draws
    are kept (4 draws in a first step, 2 in any other), so the random stream stays upstream's.
    """
    log_snr, log_snr_next = cosine_log_snr(t), cosine_log_snr(t_next)
    noise_scale = per_image((t_next != 0).to(x.dtype), x)
    eps = model(x, log_snr, cond)
    randn_like(x, generator)
    if len(old_eps) == 0:
        x_mid, _ = posterior_sample(x, eps, log_snr, log_snr_next, randn_like(x, generator), noise_scale, clip_value)
        eps_mid = model(x_mid, log_snr_next, cond)
        randn_like(x, generator)
        eps_prime = (eps + eps_mid) / 2
    else:
        history = list(old_eps)[-3:]
        weights, denominator = ADAMS_BASHFORTH[len(history)]
        eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(history)])) / denominator
    x_next, x0 = posterior_sample(x, eps_prime, log_snr, log_snr_next, randn_like(x, generator), noise_scale,
                                  clip_value)
    return x_next, x0, eps


@torch.no_grad()
def sample_plms(model, x, timesteps, cond=None, callback=None, generator=None, clip_value=10.0, progress=False):
    """Return x_0 (B, C, H, W), clamped to ±clip_value: upstream's PLMS sampler (external/plms.py) from x.

    The first step makes 2 model calls, every later one 1. callback, if given, gets
    {"i", "t", "x", "x0"} after every step.
    """
    old_eps = []
    for i, t, t_next in _time_pairs(timesteps, x, progress):
        x, x0, eps = plms_step(model, x, t, t_next, cond, old_eps, generator, clip_value)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x.clamp(-clip_value, clip_value)


@torch.no_grad()
def denoise_plms_truncated(model, x0, max_thres, cond=None, plms_steps=50, generator=None, clip_value=10.0,
                           high_noise="upstream"):
    """Return (x̂_0, x_noisy, noise, ᾱ): x0 noised to time max_thres, then denoised by PLMS to time 0.

    This is upstream's PLMSSampler.sample(image, max_thres, return_noise=True), the target of the
    distillation. x̂_0, x_noisy and noise are (B, C, H, W); ᾱ = sigmoid(λ(max_thres)) is (B,).
    The PLMS runs truncated_steps(max_thres) steps on linspace(max_thres, 0). For max_thres ≥ 0.99
    upstream instead runs the full plms_steps grid from t = 1 starting at the clean x0 (not at
    x_noisy); high_noise="upstream" keeps that, "noised" starts from x_noisy on the truncated grid.

    Args:
        x0: clean latents (B, C, H, W).
        max_thres: noise level as a time in [0, 1], a Python float (no device sync).
        cond: the model's conditioning, e.g. EFT features (B, 256, H, W).
    """
    check_choice("high_noise", high_noise, HIGH_NOISE_STARTS)
    log_snr = cosine_log_snr(torch.full(x0.shape[:1], max_thres, device=x0.device, dtype=x0.dtype))
    noise = randn_like(x0, generator)
    x_noisy = q_sample(x0, log_snr, noise)
    if max_thres >= 0.99 and high_noise == "upstream":
        x, timesteps = x0, sampling_times(plms_steps, device=x0.device)
    else:
        x, timesteps = x_noisy, sampling_times(truncated_steps(max_thres, plms_steps), max_thres, device=x0.device)
    x = sample_plms(model, x, timesteps, cond, generator=generator, clip_value=clip_value)
    return x, x_noisy, noise, torch.sigmoid(log_snr)

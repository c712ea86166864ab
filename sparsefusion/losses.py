"""The loss functions of training and distillation, as upstream (and, for the VAE, latent diffusion) computes them.

    huber(x, y)                  elementwise pseudo-Huber: the EFT's colour loss, the NeRF's colour and silhouette
    mean_huber(x, y)             its mean: the NeRF's colour and silhouette terms
    opacity_term(silhouettes)    the NeRF's opacity regulariser
    weighted_l1(x, y, weights)   the distillation's (1 − ᾱ)·L1 to a VLDM denoising
    kl_to_standard_normal(q)     the VAE stage's KL term
"""

import torch


def huber(x, y, scaling=0.1):
    """Return the elementwise pseudo-Huber loss scaling·(sqrt(1 + (x − y)²/scaling²) − 1), as upstream.

    Upstream's EFT colour loss (train.py) is its mean over the rendered rays, masked to the valid region.
    """
    return ((1 + (x - y) ** 2 / scaling ** 2).clamp(min=1e-4).sqrt() - 1) * scaling


def mean_huber(x, y):
    """Return the mean |pseudo-Huber| of x against y (any equal shapes), a scalar: upstream's NeRF terms."""
    return huber(x, y).abs().mean()


def opacity_term(silhouettes):
    """Return mean sqrt(s² + 0.01) of silhouettes (any shape), a scalar: upstream's opacity regulariser."""
    return torch.sqrt(silhouettes ** 2 + 0.01).mean()


def weighted_l1(images, targets, weights):
    """Return the mean over B of weights[b]·mean|images[b] − targets[b]|, a scalar.

    images, targets: (B, C, H, W); weights: (B,), in the distillation 1 − ᾱ at the noise level of
    each target. For B = 1 this is upstream's fusion loss (1 − ᾱ)·|render − denoised|.mean().
    """
    return (weights * (images - targets).abs().flatten(1).mean(dim=1)).mean()


def kl_to_standard_normal(posterior):
    """Return KL(q(z|x) ‖ N(0, I)) per image (B,), summed over latents: ½ Σ (μ² + σ² − 1 − log σ²)."""
    terms = posterior.mean ** 2 + posterior.std ** 2 - 1.0 - posterior.logvar
    return 0.5 * terms.flatten(1).sum(dim=1)

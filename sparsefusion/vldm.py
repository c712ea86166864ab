"""The view-conditioned latent diffusion model (VLDM): upstream's sparsefusion/vldm.py DDPM, one UNet.

Continuous-time Gaussian diffusion on SD VAE latents (B, 4, 32, 32) with the cosine log-SNR
schedule, conditioned on EFT features (B, 256, 32, 32) by channel concatenation; the UNet predicts ε.

    vldm = VLDM.from_checkpoint("checkpoints/sf/hydrant/ckpt_latest.pt").cuda()
    loss = vldm(latents, features, loss_mask=mask)                    # training
    z = vldm.sample(features, sampler="plms")                         # a latent for a query view
    x0, x_noisy, noise, alpha_bar = vldm.denoise(latents, features, max_thres=0.4)  # distillation

State-dict keys are upstream's (`unets.0.…`); checkpoints are upstream train.py's {'step',
'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict'} (sparsefusion/checkpoint.py's
model_checkpoint; train.py writes them, save_vldm the weights alone).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.external.imagen_unet import Unet, UnetConfig
from sparsefusion.checkpoint import load_file, load_state_dict_strict, model_checkpoint, save_atomic, stored_config
from sparsefusion.config import check_choice
from sparsefusion.errors import UserError
from sparsefusion.fast_unet import fast_unet
from sparsefusion.sampling import (HIGH_NOISE_STARTS, denoise_plms_truncated, denoise_plms_truncated_grouped, randn_like,
                                   sample_ancestral, sample_plms)
from sparsefusion.schedule import cosine_log_snr, p2_loss_weight, q_sample, random_times, sampling_times

SAMPLERS = ("ancestral", "plms")
WHERE_TO_GET = "the SparseFusion release (see checkpoints/README.md)"


@dataclass
class VLDMConfig:
    """The diffusion wrapper's settings; the defaults are upstream's utils/load_model.py DDPM."""

    unet: UnetConfig = field(default_factory=UnetConfig)  # the denoiser
    image_size: int = 32                # latent height and width
    sample_steps: int = 500             # steps of ancestral sampling (upstream's `timesteps`)
    plms_steps: int = 50                # steps of a PLMS run from t = 1
    cond_drop_prob: float = 0.1         # training: probability of zeroing a sample's EFT features
    p2_loss_weight_gamma: float = 0.5   # P2 loss weighting exponent γ; 0 weighs all times equally
    p2_loss_weight_k: float = 1.0       # P2 loss weighting offset k
    clip_value: float = 10.0            # x̂_0 is clamped to ±clip_value (no dynamic thresholding)
    high_noise: str = "upstream"        # PLMS from max_thres ≥ 0.99 starts at t = 1 from the clean latent ("upstream")
                                        # or on the truncated grid from the noised latent ("noised")


def keep_mask(batch, keep_prob, device=None, generator=None):
    """Return a (B,) bool mask, each True with probability keep_prob; no draw when keep_prob is 0 or 1."""
    if keep_prob >= 1:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if keep_prob <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.empty(batch, device=device).uniform_(0, 1, generator=generator) < keep_prob


class VLDM(nn.Module):
    """Diffusion over SD latents with an Imagen UNet predicting ε from (z_t, λ, EFT features)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or VLDMConfig()
        check_choice("high_noise", self.config.high_noise, HIGH_NOISE_STARTS)
        self.unets = nn.ModuleList([Unet(self.config.unet)])

    @property
    def unet(self):
        """The UNet: a callable (z_t (B, 4, H, W), λ (B,), features (B, 256, H, W)) -> ε̂."""
        return self.unets[0]

    def latent_shape(self, batch):
        """Return the shape (B, C, H, W) of a batch of latents."""
        return (batch, self.config.unet.channels, self.config.image_size, self.config.image_size)

    def forward(self, x0, cond_images, loss_mask=None, generator=None):
        """Return the training loss (a scalar): the P2-weighted ε mean squared error at random times.

        Random draws, in upstream's order: times uniform in [0, 0.999), the noise, then which samples
        keep their EFT features (each dropped with probability cond_drop_prob).

        Args:
            x0: clean latents (B, 4, H, W).
            cond_images: EFT features (B, 256, H, W).
            loss_mask: (B, 4, H, W) or broadcastable, 1 where the loss counts; it multiplies
                prediction and target, and the mean still runs over every element (as upstream).
        """
        cfg = self.config
        batch = x0.shape[0]
        times = random_times(batch, x0.device, generator)
        noise = randn_like(x0, generator)
        keep = keep_mask(batch, 1 - cfg.cond_drop_prob, x0.device, generator)
        log_snr = cosine_log_snr(times)
        pred = self.unet(q_sample(x0, log_snr, noise), log_snr, cond_images * keep[:, None, None, None])
        target = noise
        if loss_mask is not None:
            pred, target = pred * loss_mask, target * loss_mask
        losses = F.mse_loss(pred, target, reduction="none").flatten(1).mean(dim=1)
        return (losses * p2_loss_weight(log_snr, cfg.p2_loss_weight_gamma, cfg.p2_loss_weight_k)).mean()

    @torch.no_grad()
    def sample(self, cond_images, sampler="ancestral", model=None, generator=None, progress=False):
        """Return latents (B, 4, H, W) sampled from pure noise for EFT features cond_images (B, 256, H, W).

        sampler "ancestral" runs sample_steps DDPM steps, "plms" upstream's PLMS with plms_steps steps.
        model: the UNet, or a fast version of it (fast_model); defaults to self.unet.
        """
        check_choice("sampler", sampler, SAMPLERS)
        cfg, model = self.config, model or self.unet
        x = torch.randn(self.latent_shape(cond_images.shape[0]), generator=generator, device=cond_images.device)
        if sampler == "ancestral":
            timesteps = sampling_times(cfg.sample_steps, device=x.device)
            return sample_ancestral(model, x, timesteps, cond_images, generator=generator,
                                    clip_value=cfg.clip_value, progress=progress)
        randn_like(x, generator)  # upstream's PLMSSampler noises the random start once more and discards it
        return sample_plms(model, x, sampling_times(cfg.plms_steps, device=x.device), cond_images,
                           generator=generator, clip_value=cfg.clip_value, progress=progress)

    @torch.no_grad()
    def denoise(self, latents, cond_images, max_thres, model=None, generator=None):
        """Return (x̂_0, x_noisy, noise, ᾱ): latents noised to time max_thres and denoised by PLMS.

        The distillation's call (see sampling.denoise_plms_truncated): x̂_0, x_noisy and noise are
        (B, 4, H, W), ᾱ is (B,). max_thres is a Python float in [0, 1].
        """
        cfg = self.config
        return denoise_plms_truncated(model or self.unet, latents, max_thres, cond_images, cfg.plms_steps,
                                      generator, cfg.clip_value, cfg.high_noise)

    @torch.no_grad()
    def denoise_grouped(self, latents, cond_images, max_thres, model=None, generators=None):
        """Return (x̂_0, x_noisy, noise, ᾱ) of G groups of latents (G·b, 4, H, W), each at its own noise level.

        Group g (rows g·b … (g+1)·b − 1) gets what denoise(latents_g, cond_g, max_thres[g],
        generator=generators[g]) gives it, with the G truncated PLMS runs sharing UNet calls
        (sampling.denoise_plms_truncated_grouped); max_thres: G Python floats; ᾱ is (G·b,).
        """
        cfg = self.config
        return denoise_plms_truncated_grouped(model or self.unet, latents, max_thres, cond_images, cfg.plms_steps,
                                              generators, cfg.clip_value, cfg.high_noise)

    def fast_model(self, fast_config=None):
        """Return the UNet as a fast callable for sample/denoise (see sparsefusion.fast_unet.FastPathConfig)."""
        return fast_unet(self.unet, fast_config)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_checkpoint(cls, path, config=None):
        """Return a VLDM on the CPU with the weights of a checkpoint {'model_state_dict': …}, loaded strictly.

        The architecture is config, else the one save_vldm stored, else upstream's.
        """
        checkpoint = read_checkpoint(path)
        with torch.device("meta"):  # no random initialisation of 400 M parameters that are overwritten
            model = cls(stored_config(checkpoint, VLDMConfig, config))
        model.to_empty(device="cpu")
        load_state_dict_strict(model, checkpoint["model_state_dict"], f"VLDM checkpoint {path}")
        return model

    def load_checkpoint(self, path):
        """Load the weights of a checkpoint file strictly and return the file's whole object."""
        checkpoint = read_checkpoint(path)
        load_state_dict_strict(self, checkpoint["model_state_dict"], f"VLDM checkpoint {path}")
        return checkpoint


def save_vldm(vldm, path, step=0):
    """Write `{'step': step, 'model_state_dict': ...}` (upstream's layout) plus our 'config' atomically to path."""
    return save_atomic(model_checkpoint(vldm, step), path)


def read_checkpoint(path):
    """Return the object of a VLDM checkpoint file, which must hold a 'model_state_dict'."""
    checkpoint = load_file(path, "VLDM checkpoint", WHERE_TO_GET)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise UserError(f"VLDM checkpoint {path} has no 'model_state_dict'; is it an EFT or VAE checkpoint?")
    return checkpoint

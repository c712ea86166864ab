"""Diffusion guidance: what the VLDM makes of the NeRF's renders, as the loss the distillation minimises.

SparseFusion §3.3, as upstream's distillation step after iteration 1000. For renders x (B, 3, S, S)
in [0, 1] and the cached EFT features of their cameras:

1. noise level: t = u · noise_level_scale clamped to at most 0.99, u ~ U[0, 1), one draw of the CPU
   generator per call (upstream: scale 1);
2. encode: z = E(x), the VAE posterior's mode, scaled;
3. truncated PLMS: z noised to time t, then denoised to time 0 conditioned on the features: ẑ_0;
4. decode: x̂ = D(ẑ_0) clamped to [0, 1], the target (steps 1–4 see no gradient);
5. loss: (1 − ᾱ(t))·mean|x − x̂| (the weight grows with the noise level), plus, when asked,
   perceptual_weight·LPIPS(x, x̂); gradients reach the NeRF through x only.

The loop (sparsefusion/distill.py) owns the NeRF, the cameras and the schedule; it calls `loss`. All B
renders of one call share one noise level (several views of a scene: distill.views_per_step).

Several scenes at once (sparsefusion/multi_scene.py): scene_losses takes one DiffusionGuidance per scene,
each drawing its scene's noise level and PLMS noise from that scene's generators, and computes every
scene's targets in one batch: one VAE encode, truncated PLMS runs that share UNet calls
(VLDM.denoise_grouped), one decode and one LPIPS call over all scenes' renders.
"""

from dataclasses import dataclass

import torch

from sparsefusion.losses import weighted_l1
from sparsefusion.perceptual import lpips_distance
from sparsefusion.precision import autocast

MAX_NOISE_LEVEL = 0.99  # upstream clamps its draw here; from 0.99 on its PLMS restarts at t = 1 (VLDMConfig.high_noise)


@dataclass
class GuidanceTargets:
    """The VLDM's denoisings of B renders at one noise level."""

    images: torch.Tensor   # (B, 3, S, S) in [0, 1], no gradient
    weights: torch.Tensor  # (B,) 1 − ᾱ(t): the L1 weight of each target
    noise_level: object    # t in [0, 0.99], or a list of G of them (one per block of renders)


class DiffusionGuidance:
    """Turns renders into the distillation's diffusion loss through frozen VAE, VLDM and LPIPS models."""

    def __init__(self, models, perceptual_weight=0.1, precision="fp32", generator=None, device_generator=None,
                 noise_level_scale=1.0):
        """Args:
            models: sparsefusion.models.Models (codec, vldm, unet, lpips; lpips None = no perceptual term).
            perceptual_weight: weight of the LPIPS term.
            precision: autocast of the VLDM's UNet (sparsefusion.precision); the VAE keeps its own.
            generator: CPU generator of the noise levels; device_generator: of the PLMS noise.
            noise_level_scale: the noise levels' range, [0, scale) (upstream: 1).
        """
        self.models, self.perceptual_weight, self.precision = models, perceptual_weight, precision
        self.noise_level_scale = noise_level_scale
        self.generator, self.device_generator = generator, device_generator

    def draw_noise_level(self):
        """Return t = min(u · noise_level_scale, 0.99), u ~ U[0, 1), a Python float from the CPU generator (no sync)."""
        return min(float(torch.rand(1, generator=self.generator)) * self.noise_level_scale, MAX_NOISE_LEVEL)

    @torch.no_grad()
    def targets(self, images, features, noise_level, device_generators=None):
        """Return the GuidanceTargets of renders images (B, 3, S, S) in [0, 1] with EFT features (B, C, h, w).

        noise_level: t, drawing the PLMS noise from this guidance's device generator; or G levels, one per
        equal block of the renders (G scenes'), with device_generators their G generators.
        """
        models = self.models
        with autocast(images.device, self.precision):
            latents = models.codec.encode_images(images)
            if isinstance(noise_level, (list, tuple)):
                denoised, _, _, alpha_bar = models.vldm.denoise_grouped(latents, features, noise_level,
                                                                         model=models.unet,
                                                                         generators=device_generators)
            else:
                denoised, _, _, alpha_bar = models.vldm.denoise(latents, features, noise_level, model=models.unet,
                                                                 generator=self.device_generator)
            target = models.codec.decode_latents(denoised).float().clamp(0.0, 1.0)
        return GuidanceTargets(images=target, weights=1 - alpha_bar.float(), noise_level=noise_level)

    def loss(self, images, features, perceptual=True):
        """Return the loss terms {'l1', ['perceptual',] 'total'} (scalars) of renders images (B, 3, S, S).

        'l1' is the (1 − ᾱ)-weighted L1 to the targets; 'perceptual' the mean LPIPS to them, present when
        perceptual is True and the models have LPIPS; 'total' = l1 + perceptual_weight·perceptual.
        """
        targets = self.targets(images, features, self.draw_noise_level())
        return self.terms(images, targets.images, targets.weights, perceptual)

    def terms(self, images, targets, weights, perceptual=True, distances=None):
        """Return loss's terms of renders images (B, 3, S, S) against targets (B, 3, S, S) with L1 weights (B,).

        distances: the LPIPS distances (B,) of images to targets when already computed, else computed here.
        """
        terms = {"l1": weighted_l1(images, targets, weights)}
        terms["total"] = terms["l1"]
        if perceptual and self.models.lpips is not None:
            if distances is None:
                distances = lpips_distance(self.models.lpips, images, targets)
            terms["perceptual"] = distances.mean()
            terms["total"] = terms["total"] + self.perceptual_weight * terms["perceptual"]
        return terms


def scene_losses(guidances, images, features, perceptual=True):
    """Return S dicts of loss terms, DiffusionGuidance.loss's of each scene, computed in one batch for S scenes.

    guidances: S DiffusionGuidance with one set of models and settings, each holding its scene's
    generators; images (S·K, 3, H, W) in [0, 1] and features (S·K, C, h, w): scene s's K renders and
    their cameras' EFT features are the s-th block of K. Each scene draws its noise level from its CPU
    generator and its PLMS noise from its device generator, in the order of its own loss call, so scene s
    gets what guidances[s].loss(images_s, features_s) would give, up to the floating-point differences
    of larger batches; the VAE, each PLMS step's UNet and LPIPS see one batch for all scenes.
    """
    first, scenes = guidances[0], len(guidances)
    for guidance in guidances[1:]:
        if (guidance.models is not first.models or guidance.perceptual_weight != first.perceptual_weight
                or guidance.precision != first.precision):
            raise ValueError("scene_losses needs the guidance of every scene to use one set of models and settings")
    levels = [guidance.draw_noise_level() for guidance in guidances]
    targets = first.targets(images, features, levels, [guidance.device_generator for guidance in guidances])
    distances = None
    if perceptual and first.models.lpips is not None:
        distances = lpips_distance(first.models.lpips, images, targets.images).chunk(scenes)
    return [guidance.terms(part, target, weights, perceptual, None if distances is None else distances[s])
            for s, (guidance, part, target, weights) in enumerate(zip(guidances, images.chunk(scenes),
                                                                     targets.images.chunk(scenes),
                                                                     targets.weights.chunk(scenes)))]

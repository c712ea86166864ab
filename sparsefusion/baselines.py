"""What the distilled NeRF is measured against, per scene camera: the EFT's images, VLDM samples, the nearest input.

SparseFusion's paper compares the distilled NeRF with its ingredients: the EFT alone (its colour
head, a regression that blurs what it cannot see) and view-conditioned diffusion sampled per view
(sharp but inconsistent across views). The nearest input view is the trivial baseline: the input
image whose camera looks most nearly the same way. A NeRF fit to the input views alone is the
fourth (DistillConfig.method = 'inputs_only').
"""

import torch

from sparsefusion.metrics import frame_means, scene_metrics

BASELINES = ("eft", "vldm", "nearest_input")


def nearest_input_views(cameras, input_index):
    """Return (N,) indices into input_index: for each camera, the input whose optical axis is closest in angle.

    With row vectors (X_view = X_world R + T) a camera's viewing direction in the world is R's third column.
    """
    axes = cameras.R[:, :, 2]                                   # (N, 3)
    inputs = axes[torch.as_tensor(input_index, device=axes.device)]  # (V, 3)
    return (axes @ inputs.T).argmax(dim=1)


@torch.no_grad()
def vldm_samples(models, features, generator=None, batch=16):
    """Return images (N, 3, S, S) in [0, 1]: PLMS samples from noise conditioned on EFT features (N, C, h, w)."""
    images = []
    for part in features.split(batch):
        latents = models.vldm.sample(part, sampler="plms", model=models.unet, generator=generator)
        images.append(models.codec.decode_latents(latents.float()))
    return torch.cat(images)


def baseline_images(distillation, scene_images, views, generator=None):
    """Return {name: images (K, 3, S, S)} of the BASELINES at the scene cameras views (K indices)."""
    cache = distillation.cache
    nearest = nearest_input_views(distillation.cameras.scene, distillation.input_index)[views]
    return {
        "eft": cache.eft_images[views].clamp(0, 1),
        "vldm": vldm_samples(distillation.models, cache.features[views], generator),
        "nearest_input": scene_images[distillation.input_index.to(scene_images.device)[nearest]],
    }


def baseline_metrics(distillation, scene_images, views, lpips_model=None, generator=None):
    """Return {name: {'novel_views': means, 'frames': per-frame metrics, 'views': views}} of the BASELINES.

    Pass the novel views (not the input views: there the nearest input is the ground truth itself).
    """
    images = baseline_images(distillation, scene_images, views, generator)
    scored = {}
    for name in BASELINES:
        result = scene_metrics(images[name].cpu(), scene_images[views].cpu(), lpips_model)
        scored[name] = {"novel_views": frame_means(result["frames"]), "frames": result["frames"], "views": list(views)}
    return scored

"""Image metrics as upstream reports them: PSNR, SSIM (scikit-image) and LPIPS(vgg), per frame and per scene.

Upstream (utils/common_utils.get_metrics) computes them per rendered frame on float32 numpy
images (H, W, 3) in [0, 1], with data_range=1 and the channel axis last, and averages the
frames of a scene. It labels these numbers "for debugging only": the paper's evaluation
protocol is not in its release.
"""

import numpy as np
import skimage.metrics
import torch

from sparsefusion.perceptual import lpips_distance


def psnr(pred, gt):
    """Return the PSNR in dB of pred against gt, float32 arrays (H, W, 3) in [0, 1] (peak 1)."""
    return float(skimage.metrics.peak_signal_noise_ratio(pred, gt, data_range=1))


def ssim(pred, gt):
    """Return the SSIM of pred against gt, float32 arrays (H, W, 3) in [0, 1]: 7x7 uniform windows, mean over channels."""
    return float(skimage.metrics.structural_similarity(pred, gt, channel_axis=-1, data_range=1))


def _batch_of_one(image, device):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)  # (1, 3, H, W)


def lpips(model, pred, gt):
    """Return the LPIPS distance between float32 arrays pred and gt (H, W, 3) in [0, 1], computed on model's device."""
    device = next(model.parameters()).device
    with torch.no_grad():
        # upstream passes the ground truth first
        return float(lpips_distance(model, _batch_of_one(gt, device), _batch_of_one(pred, device))[0])


def image_metrics(pred, gt, lpips_model=None):
    """Return {"psnr", "ssim", "lpips"} of one frame; arrays (H, W, 3) in [0, 1]; "lpips" is None without a model."""
    return {
        "psnr": psnr(pred, gt),
        "ssim": ssim(pred, gt),
        "lpips": None if lpips_model is None else lpips(lpips_model, pred, gt),
    }


def hwc_frames(images):
    """Return float32 numpy frames (N, H, W, 3) of images (N, 3, H, W), as upstream hands them to scikit-image."""
    return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def scene_metrics(preds, gts, lpips_model=None):
    """Return the frame means {"psnr", "ssim", "lpips", "frames": [per-frame dicts]} of renders preds vs gts.

    Args:
        preds, gts: (N, 3, H, W) in [0, 1]; upstream evaluates every camera of the scene, the
            context views included.
        lpips_model: from perceptual.build_lpips("vgg"), or None: "lpips" is then None.
    """
    if preds.shape != gts.shape or preds.ndim != 4 or len(preds) == 0:
        raise ValueError(f"preds and gts must both be (N>0, 3, H, W), got {tuple(preds.shape)} and {tuple(gts.shape)}")
    frames = [image_metrics(pred, gt, lpips_model) for pred, gt in zip(hwc_frames(preds), hwc_frames(gts))]
    return {**frame_means(frames), "frames": frames}


def frame_means(frames):
    """Return {"psnr", "ssim", "lpips"}: means over per-frame metric dicts; "lpips" is None when a frame has none."""
    means = {key: float(np.mean([frame[key] for frame in frames])) for key in ("psnr", "ssim")}
    has_lpips = all(frame["lpips"] is not None for frame in frames)
    means["lpips"] = float(np.mean([frame["lpips"] for frame in frames])) if has_lpips else None
    return means

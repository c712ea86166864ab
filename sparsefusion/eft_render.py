"""Rendering EFT features for query cameras: the 32×32 ray grid, chunking, inference mode, the feature cache.

Upstream renders the EFT through a PyTorch3D implicit renderer: a 32×32 grid of rays per query
camera (a 256-pixel image at scale 8), 20 points per ray between d̄ − 5 and d̄ + 5, where d̄ is the
mean distance of the scene's camera centres from the origin; the output per ray is the colour head's
RGB followed by the 256-d feature. The distillation caches this for every scene camera and 50 path
cameras, each query with the cameras re-expressed relative to it, and upsamples the RGB ×8 into the
"EFT image" that supervises the NeRF's first 1000 iterations.

Upstream never calls eval() on the EFT, so at inference BatchNorm normalises with the context views'
batch statistics and the transformers' dropout is active. mode="upstream" reproduces that (without
letting rendering move the running statistics); mode="eval" uses running statistics and no dropout.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.config import check_choice
from sparsefusion.precision import autocast
from sparsefusion.relative_cameras import relative_cameras
from sparsefusion.rays import grid_rays, grid_xy

MODES = ("upstream", "eval")
PRECISIONS = ("fp32", "bf16", "fp16")  # of sparsefusion.precision's


@dataclass
class FeatureRenderConfig:
    image_size: int = 256          # size of the image whose pixel grid the rays follow (square)
    scale: int = 8                 # rays every `scale` pixels: a 32×32 grid for 256
    n_points: int = 20             # points per ray, evenly spaced between near and far
    depth_margin: float = 5.0      # near, far = d̄ − margin, d̄ + margin
    mode: str = "upstream"         # "upstream": BatchNorm batch statistics and dropout on; "eval": neither
    precision: str = "fp32"        # "fp32", or autocast "bf16" / "fp16" for the networks (geometry stays fp32)
    views_per_chunk: int = 8       # query cameras rendered together; bounds memory for any number of views

    def __post_init__(self):
        check_choice("FeatureRenderConfig.mode", self.mode, MODES)
        check_choice("FeatureRenderConfig.precision", self.precision, PRECISIONS)
        if self.image_size % self.scale:
            raise ValueError(f"FeatureRenderConfig.image_size {self.image_size} is not a multiple of scale {self.scale}")

    @property
    def grid_size(self):
        return self.image_size // self.scale


@dataclass
class FeatureCache:
    """EFT outputs of Q query cameras, as the distillation consumes them."""

    query_index: torch.Tensor  # (Q,) indices of the query cameras
    features: torch.Tensor     # (Q, C, 32, 32) the VLDM's conditioning
    eft_images: torch.Tensor   # (Q, 3, 256, 256) colour head RGB upsampled ×8 (bilinear)


def mean_camera_distance(cameras):
    """Return d̄: the mean distance of the camera centres from the world origin, a float."""
    return cameras.get_camera_center().norm(dim=-1).mean().item()


def depth_range(cameras, margin=5.0):
    """Return (near, far) = (d̄ − margin, d̄ + margin) for a scene's cameras, as upstream's renderers use."""
    distance = mean_camera_distance(cameras)
    return distance - margin, distance + margin


def feature_grid_xy(config, device=None):
    """Return the (h, w, 2) NDC xy of the feature rays: upstream's grid, with the full image's half pixel.

    x and y run from 1 − 1/S to −1 + 1/S (S = image_size) in grid_size steps: the ends sit half a
    pixel of the full image inside the border, not half a pixel of the 32×32 grid.
    """
    inner = 1.0 - 1.0 / config.image_size
    return grid_xy(config.grid_size, config.grid_size, inner, -inner, inner, -inner, device=device)


def feature_rays(cameras, near, far, config):
    """Return the (B, h, w) grid RayBundle of the feature renderer for B query cameras."""
    xy = feature_grid_xy(config, device=cameras.device)
    return grid_rays(cameras, config.grid_size, config.grid_size, near, far, config.n_points, xy=xy)


@contextmanager
def eft_mode(eft, mode):
    """Run a block with the EFT in an inference mode, then restore every submodule's training flag.

    "upstream": training mode (BatchNorm batch statistics, dropout on), as upstream renders; the
    BatchNorm layers are told not to track running statistics meanwhile, so rendering leaves the
    model's state unchanged. "eval": running statistics, no dropout.
    """
    check_choice("mode", mode, MODES)
    training = {module: module.training for module in eft.modules()}
    batch_norms = [m for m in eft.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tracking = {m: m.track_running_stats for m in batch_norms}
    eft.train(mode == "upstream")
    if mode == "upstream":
        for m in batch_norms:
            m.track_running_stats = False
    try:
        yield eft
    finally:
        for module, flag in training.items():
            module.training = flag
        for m, flag in tracking.items():
            m.track_running_stats = flag


def _chunks(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def render_features(eft, query_cameras, context_cameras, context_images, near, far, config=None):
    """Return (B, h, w, 3 + C): colour head RGB and EFT features on the feature grid of B query cameras.

    Args:
        query_cameras: B cameras.
        context_cameras: the V context cameras in the frame of the query cameras, or B·V cameras
            (query-major) when every query has its own frame.
        context_images: (V, 3, H, W) in [0, 1].
        near, far: depth range of the ray points (see depth_range).
    The backbone runs once; the query cameras go through the transformers views_per_chunk at a time.
    """
    config = config or FeatureRenderConfig()
    n_query, n_views = len(query_cameras), context_images.shape[0]
    per_query = len(context_cameras) == n_query * n_views and n_query > 1
    outputs = []
    with torch.no_grad(), eft_mode(eft, config.mode):
        with autocast(context_images.device, config.precision):
            context = eft.encode(context_images)
        for chunk in _chunks(n_query, config.views_per_chunk):
            cameras = context_cameras[chunk.start * n_views:chunk.stop * n_views] if per_query else context_cameras
            rays = feature_rays(query_cameras[chunk], near, far, config)
            with autocast(context_images.device, config.precision):
                outputs.append(eft(rays, cameras, context).packed().float())
    return torch.cat(outputs)


def feature_cache(eft, cameras, context_index, context_images, near, far, query_index=None, config=None):
    """Return the FeatureCache of cameras[query_index] (default: all), each query in its own frame.

    As upstream's distillation: for every query, all cameras are re-expressed relative to it with the
    query at the origin (R = I, T = 0), and the context views are cameras[context_index] with images
    context_images (V, 3, H, W). near/far come from the scene's own cameras (depth_range).
    """
    config = config or FeatureRenderConfig()
    if query_index is None:
        query_index = torch.arange(len(cameras))
    query_index = torch.as_tensor(query_index).reshape(-1)
    context_index = torch.as_tensor(context_index).reshape(-1)
    frames = [relative_cameras(cameras, int(q), center_at_origin=True) for q in query_index]
    query_cameras = PerspectiveCameras.cat([frame[int(q)] for frame, q in zip(frames, query_index)])
    context_cameras = PerspectiveCameras.cat([frame[context_index] for frame in frames])
    packed = render_features(eft, query_cameras, context_cameras, context_images, near, far, config)
    rgb, features = packed.permute(0, 3, 1, 2).split([3, packed.shape[-1] - 3], dim=1)
    return FeatureCache(
        query_index=query_index,
        features=features.contiguous(),
        eft_images=F.interpolate(rgb, scale_factor=config.scale, mode="bilinear"),
    )

"""A custom scene's centre and scale, chosen so that its cameras look like CO3D's to the EFT and the NeRF.

The released models know CO3D's scene scale: the EFT samples its rays between d̄ − 5 and d̄ + 5 (d̄
the cameras' mean distance from the world origin) and the NeRF lives in [−4, 4]³ around the origin.
A capture posed by COLMAP or nerfstudio has an arbitrary origin and unit, so the rule ("cameras") is:

1. centre c = the point nearest, in least squares, to every camera's optical axis: the point the
   capture looks at (Σ (I − d dᵀ)) c = Σ (I − d dᵀ) C over camera centres C and unit axes d;
2. scale s = distance / mean |C − c|, so that the cameras are on average `distance` from the
   centre (default 10: CO3D-scaled scenes have their cameras 7–15 units away — docs/data.md — and
   our synthetic stand-in averages 10.5 over its categories);
3. X' = (X − c) · s for every world point: a similarity, so every projection stays where it was;
   each camera keeps R and gets T' = s · (T + c R).
"""

import torch

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.errors import UserError

DEFAULT_DISTANCE = 10.0


def axes_meeting_point(cameras):
    """Return (point (3,), conditioning) of cameras (N): the least-squares nearest point to their optical axes.

    conditioning is the smallest eigenvalue of the mean of (I − d dᵀ): 0 when every axis is parallel
    (no meeting point), 2/3 for axes spread evenly over every direction.
    """
    centres = cameras.get_camera_center().double()                       # (N, 3)
    axes = cameras.R[:, :, 2].double()                                    # (N, 3) view +Z in world coordinates
    axes = axes / axes.norm(dim=-1, keepdim=True)
    projectors = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]  # (N, 3, 3)
    system = projectors.sum(dim=0)
    target = (projectors @ centres[:, :, None]).sum(dim=0)[:, 0]
    conditioning = float(torch.linalg.eigvalsh(system / len(cameras))[0])
    return torch.linalg.solve(system, target) if conditioning > 1e-9 else centres.mean(dim=0), conditioning


def normalized_cameras(cameras, centre, scale):
    """Return cameras (N) of the world X' = (X − centre) · scale: R kept, T' = scale · (T + centre R)."""
    centre = torch.as_tensor(centre, dtype=cameras.dtype, device=cameras.device)
    T = scale * (cameras.T + (centre[None, None, :] @ cameras.R)[:, 0])
    return PerspectiveCameras(R=cameras.R, T=T, focal_length=cameras.focal_length,
                              principal_point=cameras.principal_point, image_size=cameras.image_size)


def co3d_like_normalization(cameras, distance=DEFAULT_DISTANCE, where="the scene"):
    """Return (centre (3,) float64, scale float) of the "cameras" rule (module docstring) for cameras (N).

    UserError naming where if the cameras do not look at a common point: parallel axes (a
    forward-facing capture) or a meeting point behind most of them (an inside-out capture).
    """
    fix = "SparseFusion reconstructs an object filmed from around it; if the scene is centred and scaled " \
          "already, pass custom.normalize=none"
    if len(cameras) < 2:
        raise UserError(f"{where}: one camera cannot fix a centre and scale; give at least two posed views")
    centre, conditioning = axes_meeting_point(cameras)
    if conditioning < 1e-3:
        raise UserError(f"{where}: the cameras' optical axes are (nearly) parallel, so they meet nowhere; {fix}")
    depths = cameras.to(torch.float64).world_to_view(centre[None])[:, 0, 2]
    if (depths > 0).double().mean() < 0.5:
        raise UserError(f"{where}: the point the cameras' optical axes pass nearest lies behind most of them; {fix}")
    mean_distance = float((cameras.get_camera_center().double() - centre).norm(dim=-1).mean())
    if not mean_distance > 0:
        raise UserError(f"{where}: every camera sits at the same point; {fix}")
    return centre, distance / mean_distance

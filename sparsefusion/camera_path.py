"""Camera paths around a scene: upstream's get_interpolated_path with method 'circle'.

Fit a plane to the camera centres (SVD), fit a circle to the centres within that plane (least
squares), place n cameras on the circle starting at the first camera's angle, and point them at the
point nearest to all principal rays, with "up" against the plane normal. The intrinsics are the
mean of the scene's.
"""

import math

import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform
from sparsefusion.rays import rays_from_xy


def rotate_between(points, n_from, n_to):
    """Return points (P, 3) rotated by the rotation taking unit direction n_from to n_to (Rodrigues)."""
    n_from, n_to = F.normalize(n_from, dim=0), F.normalize(n_to, dim=0)
    axis = torch.linalg.cross(n_from, n_to)
    if axis.norm() < 1e-12:  # parallel: nothing to rotate (upstream divides by zero here)
        return points.clone() if torch.dot(n_from, n_to) > 0 else rotate_about(points, _orthogonal(n_from), math.pi)
    return rotate_about(points, F.normalize(axis, dim=0), torch.arccos(torch.dot(n_from, n_to).clamp(-1, 1)))


def _orthogonal(v):
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=v.dtype) if abs(float(v[0])) < 0.9 else torch.tensor([0.0, 1.0, 0.0], dtype=v.dtype)
    return F.normalize(torch.linalg.cross(v, helper), dim=0)


def rotate_about(points, axis, angle):
    """Return points (P, 3) rotated about axis (3,) or per-point axes (P, 3) by angle (scalar or (P,)).

    Rodrigues' formula P cos θ + (k × P) sin θ + k (k · P)(1 − cos θ); a rotation only for unit k.
    """
    axis = axis.expand_as(points)
    angle = torch.as_tensor(angle, dtype=points.dtype).reshape(-1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    along = (axis * points).sum(dim=-1, keepdim=True)
    return points * cos + torch.linalg.cross(axis, points) * sin + axis * along * (1 - cos)


def fit_plane(points):
    """Return (mean (3,), unit normal (3,)) of the least-squares plane through points (N, 3).

    As upstream, the normal is flipped if that moves 2·normal closer to the mean than normal.
    """
    mean = points.mean(dim=0)
    normal = torch.linalg.svd(points - mean).Vh[2]
    if (2 * normal - mean).norm() < (normal - mean).norm():
        normal = -normal
    return mean, normal


def fit_circle_2d(x, y):
    """Return (xc, yc, r) of the least-squares circle through points (x, y), each (N,).

    Solves 2·xc·x + 2·yc·y + (r² − xc² − yc²) = x² + y² in the least-squares sense.
    """
    A = torch.stack([x, y, torch.ones_like(x)], dim=1)
    b = (x ** 2 + y ** 2)[:, None]
    c = torch.linalg.lstsq(A, b).solution[:, 0]
    xc, yc = c[0] / 2, c[1] / 2
    return xc, yc, torch.sqrt(c[2] + xc ** 2 + yc ** 2)


def nearest_point_to_rays(origins, directions):
    """Return the point (3,) minimising the summed squared distance to the lines origin + t·direction.

    Solves [I, −d_i] [x; t_i] = o_i for all rays at once in the least-squares sense, as upstream.
    """
    n = len(origins)
    A = torch.zeros(3 * n, 3 + n, dtype=origins.dtype)
    A[:, :3] = torch.eye(3, dtype=origins.dtype).repeat(n, 1)
    for i in range(n):
        A[3 * i:3 * i + 3, 3 + i] = -directions[i]
    solution = torch.linalg.pinv(A) @ origins.reshape(3 * n, 1)
    return solution[:3, 0]


def principal_ray_directions(cameras):
    """Return unit world directions (N, 3) of the rays through the cameras' mean principal point."""
    xy = cameras.principal_point.mean(dim=0).expand(len(cameras), 1, 2)
    return rays_from_xy(cameras, xy, 1.0, 15.0, 1, unit_directions=True).directions[:, 0]


def circle_path(cameras, n=50, theta_offset_max=0.0, generator=None):
    """Return n PerspectiveCameras on the circle fitted to the centres of cameras, looking at the scene.

    theta_offset_max: if > 0, each new centre is turned by a uniform random angle in
    [−theta_offset_max, theta_offset_max] about the axis centre × normal, as upstream. Upstream
    normalises those axes by the norm of all of them together, not one by one, so its "rotation"
    also shrinks the centres slightly; this is reproduced.
    """
    device = cameras.device
    cameras = cameras.to("cpu")
    centres = cameras.get_camera_center()
    mean, normal = fit_plane(centres)
    z_axis = torch.tensor([0.0, 0.0, 1.0], dtype=centres.dtype)
    in_plane = rotate_between(centres - mean, normal, z_axis)
    xc, yc, radius = fit_circle_2d(in_plane[:, 0], in_plane[:, 1])
    centre = rotate_between(torch.stack([xc, yc, torch.zeros_like(xc)])[None], z_axis, normal)[0] + mean

    angles = torch.linspace(0, 2 * math.pi, n, dtype=centres.dtype)
    u = F.normalize(centres[0] - centre, dim=0)
    v = torch.linalg.cross(normal, u)
    new_centres = centre + radius * (torch.cos(angles)[:, None] * u + torch.sin(angles)[:, None] * v)
    if theta_offset_max > 0.0:
        jitter = torch.rand(n, generator=generator, dtype=centres.dtype) * (2 * theta_offset_max) - theta_offset_max
        axes = torch.linalg.cross(new_centres, normal.expand_as(new_centres))
        new_centres = rotate_about(new_centres, axes / torch.linalg.norm(axes), jitter)

    target = nearest_point_to_rays(centres, principal_ray_directions(cameras))
    R, T = look_at_view_transform(new_centres, target[None], -normal[None])
    return PerspectiveCameras(
        R=R, T=T,
        focal_length=cameras.focal_length.mean(dim=0, keepdim=True).expand(n, 2).clone(),
        principal_point=cameras.principal_point.mean(dim=0, keepdim=True).expand(n, 2).clone(),
        image_size=cameras.image_size[:1].expand(n, 2).clone(),
    ).to(device)

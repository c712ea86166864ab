"""Perspective cameras in PyTorch3D's conventions, without PyTorch3D.

Conventions (PyTorch3D >= 0.5, "in NDC" cameras):
  * row vectors: X_view = X_world @ R + T, so the camera centre is -T @ R^T;
  * view space: +X left, +Y up, +Z forward (into the scene);
  * NDC: x_ndc = fx * X / Z + px, y_ndc = fy * Y / Z + py, with [-1, 1] spanning the shorter
    image side (the longer side spans [-s, s], s = long / short); transform_points_ndc returns
    1 / Z as its third coordinate, as PyTorch3D's projection matrix does;
  * screen space: pixel (i, j) has its centre at (j + 0.5, i + 0.5); x_ndc = (W/2 - x_s) / (S/2),
    S = min(H, W);
  * image_size is (height, width).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class PerspectiveCameras:
    """A batch of N perspective cameras with PyTorch3D's fields and NDC semantics."""

    R: torch.Tensor                # (N, 3, 3) world-to-view rotation, applied to row vectors
    T: torch.Tensor                # (N, 3) world-to-view translation
    focal_length: torch.Tensor     # (N, 2) (fx, fy) in NDC units of the shorter image side
    principal_point: torch.Tensor  # (N, 2) (px, py) in NDC
    image_size: torch.Tensor       # (N, 2) (height, width) in pixels

    def __post_init__(self):
        n = self.R.shape[0]
        expected = {"R": (n, 3, 3), "T": (n, 3), "focal_length": (n, 2), "principal_point": (n, 2), "image_size": (n, 2)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise ValueError(f"PerspectiveCameras.{name} must have shape {shape}, got {tuple(value.shape)}")

    @classmethod
    def identity(cls, n=1, focal_length=1.0, image_size=(256, 256), device=None, dtype=torch.float32):
        """Return n cameras at the origin looking down +Z, with square pixels and a centred principal point."""
        eye = torch.eye(3, device=device, dtype=dtype).expand(n, 3, 3).clone()
        return cls(
            R=eye,
            T=torch.zeros(n, 3, device=device, dtype=dtype),
            focal_length=torch.full((n, 2), float(focal_length), device=device, dtype=dtype),
            principal_point=torch.zeros(n, 2, device=device, dtype=dtype),
            image_size=torch.tensor([image_size], device=device, dtype=dtype).expand(n, 2).clone(),
        )

    @classmethod
    def cat(cls, cameras_list):
        """Return the cameras of a list of batches, concatenated in order."""
        return cls(**{f.name: torch.cat([getattr(c, f.name) for c in cameras_list]) for f in fields(cls)})

    def __len__(self):
        return self.R.shape[0]

    def __getitem__(self, index):
        """Return the cameras selected by an int, slice, list or index/bool tensor, as a batch."""
        if isinstance(index, int):
            index = [index]
        return PerspectiveCameras(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, *args, **kwargs):
        """Return the cameras moved/cast like Tensor.to; image_size stays a float tensor of pixel counts."""
        return PerspectiveCameras(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def cpu(self):
        return self.to("cpu")

    @property
    def device(self):
        return self.R.device

    @property
    def dtype(self):
        return self.R.dtype

    def world_to_view(self, points):
        """Return view-space points (N, P, 3) for world points (N, P, 3) or (P, 3)."""
        return points @ self.R + self.T[:, None, :]

    def view_to_world(self, points):
        """Return world points (N, P, 3) for view-space points (N, P, 3) or (P, 3)."""
        return (points - self.T[:, None, :]) @ self.R.transpose(1, 2)

    def get_world_to_view_transform(self):
        """Return the (N, 4, 4) world-to-view matrix for row vectors: [x, y, z, 1] @ M."""
        matrix = torch.zeros(len(self), 4, 4, device=self.device, dtype=self.dtype)
        matrix[:, :3, :3] = self.R
        matrix[:, 3, :3] = self.T
        matrix[:, 3, 3] = 1.0
        return matrix

    def get_camera_center(self):
        """Return the camera centres in world coordinates, (N, 3)."""
        return -(self.T[:, None, :] @ self.R.transpose(1, 2))[:, 0]

    def view_to_ndc(self, points_view):
        """Return (N, P, 3) NDC points (x, y, 1/Z) for view-space points (N, P, 3)."""
        depth = points_view[..., 2:3]
        xy = points_view[..., :2] / depth * self.focal_length[:, None, :] + self.principal_point[:, None, :]
        return torch.cat([xy, 1.0 / depth], dim=-1)

    def transform_points_ndc(self, points):
        """Return (N, P, 3) NDC points (x, y, 1/Z) for world points (N, P, 3) or (P, 3)."""
        return self.view_to_ndc(self.world_to_view(points))

    def unproject_points(self, xy_depth, world_coordinates=True):
        """Return points (N, P, 3) at NDC xy and view depth Z, given (N, P, 3) [x_ndc, y_ndc, Z]."""
        depth = xy_depth[..., 2:3]
        xy_view = (xy_depth[..., :2] - self.principal_point[:, None, :]) / self.focal_length[:, None, :] * depth
        points_view = torch.cat([xy_view, depth], dim=-1)
        return self.view_to_world(points_view) if world_coordinates else points_view

    def transform_points_screen(self, points):
        """Return (N, P, 3) screen points (x_px, y_px, 1/Z) for world points; pixel centres at +0.5."""
        ndc = self.transform_points_ndc(points)
        return torch.cat([ndc_to_screen(ndc[..., :2], self.image_size[:, None, :]), ndc[..., 2:]], dim=-1)


def unusable_cameras(cameras, tolerance=1e-2):
    """Return {what is wrong: [camera indices]} of the cameras no renderer can use ({} when all are usable).

    Unusable: a value that is NaN or infinite, a focal length or image side that is not positive,
    an R that is not a rotation (R Rᵀ off the identity by more than tolerance, e.g. all zeros).
    """
    cameras = cameras.to(torch.float64)
    values = torch.cat([cameras.R.flatten(1), cameras.T, cameras.focal_length, cameras.principal_point,
                        cameras.image_size], dim=1)
    finite = values.isfinite().all(dim=1)
    rotation_error = (cameras.R @ cameras.R.transpose(1, 2) - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2))
    checks = {
        "values that are NaN or infinite": ~finite,
        "a focal length or image size that is not positive": finite & ((cameras.focal_length <= 0).any(dim=1)
                                                                      | (cameras.image_size <= 0).any(dim=1)),
        "an R that is not a rotation": finite & ~(rotation_error <= tolerance),
    }
    return {what: torch.nonzero(bad)[:, 0].tolist() for what, bad in checks.items() if bad.any()}


def ndc_to_screen(xy_ndc, image_size):
    """Return pixel coordinates (..., 2) of NDC xy (..., 2) for image_size (..., 2) = (height, width)."""
    height, width = image_size[..., 0], image_size[..., 1]
    half_short = torch.minimum(height, width) / 2.0
    x = width / 2.0 - xy_ndc[..., 0] * half_short
    y = height / 2.0 - xy_ndc[..., 1] * half_short
    return torch.stack([x, y], dim=-1)


def screen_to_ndc(xy_screen, image_size):
    """Return NDC xy (..., 2) of pixel coordinates (..., 2) for image_size (..., 2) = (height, width)."""
    height, width = image_size[..., 0], image_size[..., 1]
    half_short = torch.minimum(height, width) / 2.0
    x = (width / 2.0 - xy_screen[..., 0]) / half_short
    y = (height / 2.0 - xy_screen[..., 1]) / half_short
    return torch.stack([x, y], dim=-1)


def look_at_view_transform(eye, at, up):
    """Return (R (N, 3, 3), T (N, 3)) of cameras at eye (N, 3) looking at at (N|1, 3) with up (N|1, 3).

    As PyTorch3D's look_at_view_transform: the view z axis points from eye to at, x = up × z,
    y = z × x; R holds those axes as columns and T = -eye @ R.
    """
    at, up = at.expand_as(eye), up.expand_as(eye)
    z_axis = F.normalize(at - eye, dim=-1, eps=1e-5)
    x_axis = F.normalize(torch.cross(up, z_axis, dim=-1), dim=-1, eps=1e-5)
    y_axis = F.normalize(torch.cross(z_axis, x_axis, dim=-1), dim=-1, eps=1e-5)
    R = torch.stack([x_axis, y_axis, z_axis], dim=-1)
    T = -(eye[:, None, :] @ R)[:, 0]
    return R, T

"""Rays through cameras and the harmonic embedding, with PyTorch3D's semantics.

A ray bundle holds, per camera b and ray r: an origin, a direction, the lengths of its sample points
and the NDC xy it was cast through. A point is origin + length * direction. As in PyTorch3D's
_xy_to_ray_bundle, directions are not unit length unless asked for: a direction is the view-space
vector ((x - px) / fx, (y - py) / fy, 1) rotated to world, so lengths are view-space depths.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RayBundle:
    """Rays of B cameras; ... is any ray layout, e.g. (H, W) for a grid or (R,) for random rays."""

    origins: torch.Tensor     # (B, ..., 3) world-space ray origins (the camera centres)
    directions: torch.Tensor  # (B, ..., 3) world-space directions
    lengths: torch.Tensor     # (B, ..., P) distances of the sample points along the directions
    xys: torch.Tensor         # (B, ..., 2) NDC xy each ray was cast through


def ray_bundle_to_points(bundle):
    """Return the sample points (B, ..., P, 3) of a ray bundle: origin + length * direction."""
    return bundle.origins[..., None, :] + bundle.lengths[..., :, None] * bundle.directions[..., None, :]


def grid_xy(width, height, min_x, max_x, min_y, max_y, device=None, dtype=torch.float32):
    """Return an (H, W, 2) NDC xy grid, x from min_x to max_x along W and y from min_y to max_y along H."""
    ys = torch.linspace(min_y, max_y, height, device=device, dtype=dtype)
    xs = torch.linspace(min_x, max_x, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def ndc_grid_xy(width, height, device=None, dtype=torch.float32):
    """Return the (H, W, 2) NDC xy of pixel centres, as PyTorch3D's NDCMultinomialRaysampler lays them out.

    x runs from +range_x - ½px to -range_x + ½px (left to right in the image, since +X is left),
    y from +range_y - ½px to -range_y + ½px; the shorter side spans [-1, 1].
    """
    range_x = max(width / height, 1.0)
    range_y = max(height / width, 1.0)
    half_px_x, half_px_y = range_x / width, range_y / height
    return grid_xy(width, height, range_x - half_px_x, -range_x + half_px_x, range_y - half_px_y,
                   -range_y + half_px_y, device=device, dtype=dtype)


def depth_samples(n_rays_shape, min_depth, max_depth, n_points, stratified=False, generator=None,
                  device=None, dtype=torch.float32):
    """Return lengths (*n_rays_shape, P): P evenly spaced depths, jittered within their bins if stratified."""
    depths = torch.linspace(min_depth, max_depth, n_points, device=device, dtype=dtype)
    lengths = depths.expand(*n_rays_shape, n_points)
    if stratified and n_points > 1:
        mids = 0.5 * (lengths[..., 1:] + lengths[..., :-1])
        upper = torch.cat([mids, lengths[..., -1:]], dim=-1)
        lower = torch.cat([lengths[..., :1], mids], dim=-1)
        u = torch.rand(lengths.shape, generator=generator, device=device, dtype=dtype)
        lengths = lower + (upper - lower) * u
    return lengths.contiguous()


def rays_from_xy(cameras, xy, min_depth, max_depth, n_points, unit_directions=False, stratified=False,
                 generator=None):
    """Return the RayBundle of cameras (B) cast through NDC xy (B, ..., 2).

    As PyTorch3D's _xy_to_ray_bundle: points unprojected at depths 1 and 2 give the direction (their
    difference) and the origin (the depth-1 point minus the direction).
    """
    batch, layout = xy.shape[0], xy.shape[1:-1]
    flat_xy = xy.reshape(batch, -1, 2)
    n_rays = flat_xy.shape[1]
    depth = torch.cat([flat_xy.new_ones(batch, n_rays, 1), flat_xy.new_full((batch, n_rays, 1), 2.0)], dim=1)
    plane_points = cameras.unproject_points(torch.cat([flat_xy.repeat(1, 2, 1), depth], dim=-1))
    directions = plane_points[:, n_rays:] - plane_points[:, :n_rays]
    origins = plane_points[:, :n_rays] - directions
    if unit_directions:
        directions = F.normalize(directions, dim=-1)
    lengths = depth_samples((batch, n_rays), min_depth, max_depth, n_points, stratified, generator,
                            device=xy.device, dtype=xy.dtype)
    return RayBundle(
        origins=origins.reshape(batch, *layout, 3),
        directions=directions.reshape(batch, *layout, 3),
        lengths=lengths.reshape(batch, *layout, n_points),
        xys=xy,
    )


def grid_rays(cameras, width, height, min_depth, max_depth, n_points, xy=None, unit_directions=False,
              stratified=False, generator=None):
    """Return an (B, H, W) grid RayBundle through pixel centres, as PyTorch3D's NDCMultinomialRaysampler.

    xy: an (H, W, 2) grid to use instead of the pixel centres (e.g. grid_xy with another offset).
    """
    if xy is None:
        xy = ndc_grid_xy(width, height, device=cameras.device, dtype=cameras.dtype)
    batch_xy = xy.to(device=cameras.device, dtype=cameras.dtype).expand(len(cameras), *xy.shape)
    return rays_from_xy(cameras, batch_xy, min_depth, max_depth, n_points, unit_directions, stratified, generator)


def monte_carlo_rays(cameras, n_rays, min_x, max_x, min_y, max_y, min_depth, max_depth, n_points,
                     unit_directions=False, stratified=False, generator=None):
    """Return a (B, R) RayBundle through xy drawn uniformly in [min_x, max_x] × [min_y, max_y].

    As PyTorch3D's MonteCarloRaysampler: x is drawn first, then y, for all rays of all cameras at once.
    """
    shape = (len(cameras), n_rays, 1)
    options = dict(generator=generator, device=cameras.device, dtype=cameras.dtype)
    xs = torch.rand(shape, **options) * (max_x - min_x) + min_x
    ys = torch.rand(shape, **options) * (max_y - min_y) + min_y
    xy = torch.cat([xs, ys], dim=-1)
    return rays_from_xy(cameras, xy, min_depth, max_depth, n_points, unit_directions, stratified, generator)


class HarmonicEmbedding(torch.nn.Module):
    """PyTorch3D's harmonic embedding: [sin(x·ω), cos(x·ω), x] with ω = ω0·2^k, k = 0..K-1 (logspace).

    An input (..., D) becomes (..., D·(2K+1)); within the sin and cos blocks the frequencies of one
    input dimension are contiguous (dimension-major), as PyTorch3D orders them.
    """

    def __init__(self, n_harmonic_functions=6, omega_0=1.0, logspace=True, append_input=True):
        super().__init__()
        if logspace:
            frequencies = 2.0 ** torch.arange(n_harmonic_functions, dtype=torch.float32)
        else:
            frequencies = torch.linspace(1.0, 2.0 ** (n_harmonic_functions - 1), n_harmonic_functions)
        self.register_buffer("_frequencies", frequencies * omega_0, persistent=False)
        self.append_input = append_input

    def output_dim(self, input_dim):
        """Return the embedding width for an input of input_dim channels."""
        return input_dim * (2 * len(self._frequencies) + int(self.append_input))

    def forward(self, x):
        """Return the embedding (..., D·(2K+1)) of x (..., D)."""
        phases = (x[..., None] * self._frequencies).flatten(-2)
        parts = [phases.sin(), phases.cos()] + ([x] if self.append_input else [])
        return torch.cat(parts, dim=-1)

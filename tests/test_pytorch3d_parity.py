"""Cross-checks against PyTorch3D itself, where it is importable (it is an optional extra)."""

import pytest
import torch

from sparsefusion.rays import HarmonicEmbedding, grid_rays
from tests.test_cameras import random_cameras

p3d_cameras = pytest.importorskip("pytorch3d.renderer.cameras")
p3d_raysampling = pytest.importorskip("pytorch3d.renderer.implicit.raysampling")
p3d_harmonic = pytest.importorskip("pytorch3d.renderer.implicit.harmonic_embedding")


def to_pytorch3d(cameras):
    return p3d_cameras.PerspectiveCameras(R=cameras.R, T=cameras.T, focal_length=cameras.focal_length,
                                          principal_point=cameras.principal_point, image_size=cameras.image_size)


def test_projection_and_unprojection_match_pytorch3d():
    ours = random_cameras(3).to(torch.float32)
    theirs = to_pytorch3d(ours)
    points = torch.randn(3, 20, 3)
    assert torch.allclose(ours.transform_points_ndc(points), theirs.transform_points_ndc(points), atol=1e-4)
    xy_depth = torch.cat([torch.rand(3, 20, 2) - 0.5, torch.rand(3, 20, 1) + 1], dim=-1)
    assert torch.allclose(ours.unproject_points(xy_depth), theirs.unproject_points(xy_depth, from_ndc=True), atol=1e-4)
    assert torch.allclose(ours.get_camera_center(), theirs.get_camera_center(), atol=1e-4)


def test_grid_rays_and_harmonic_embedding_match_pytorch3d():
    ours = random_cameras(2).to(torch.float32)
    ours.image_size = torch.tensor([[6.0, 10.0]]).expand(2, 2)
    sampler = p3d_raysampling.NDCMultinomialRaysampler(image_width=10, image_height=6, n_pts_per_ray=4,
                                                       min_depth=1.0, max_depth=3.0)
    theirs = sampler(to_pytorch3d(ours))
    bundle = grid_rays(ours, 10, 6, 1.0, 3.0, 4)
    for name in ("origins", "directions", "lengths", "xys"):
        assert torch.allclose(getattr(bundle, name), getattr(theirs, name), atol=1e-4), name
    x = torch.randn(5, 3)
    assert torch.allclose(HarmonicEmbedding()(x), p3d_harmonic.HarmonicEmbedding()(x), atol=1e-6)

import pytest
import torch

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.rays import (HarmonicEmbedding, grid_rays, grid_xy, monte_carlo_rays, ndc_grid_xy,
                               ray_bundle_to_points)
from tests.test_cameras import random_cameras


@pytest.mark.parametrize("width,height", [(8, 8), (12, 6), (5, 9)])
def test_grid_rays_pass_through_pixel_centres(width, height):
    cameras = random_cameras(2).to(torch.float64)
    cameras.image_size = torch.tensor([[float(height), float(width)]], dtype=torch.float64).expand(2, 2)
    bundle = grid_rays(cameras, width, height, 1.0, 5.0, 4)
    points = ray_bundle_to_points(bundle)  # (B, H, W, P, 3)
    screen = cameras.transform_points_screen(points.reshape(2, -1, 3)).reshape(2, height, width, 4, 3)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([cols, rows], dim=-1).to(torch.float64) + 0.5
    assert torch.allclose(screen[..., :2], centres[None, :, :, None].expand_as(screen[..., :2]), atol=1e-9)
    # lengths are view-space depths
    assert torch.allclose(1.0 / screen[..., 2], torch.linspace(1.0, 5.0, 4, dtype=torch.float64).expand(2, height, width, 4))
    assert torch.allclose(bundle.origins, cameras.get_camera_center()[:, None, None].expand_as(bundle.origins), atol=1e-9)


def test_ndc_grid_matches_pytorch3d_layout():
    grid = ndc_grid_xy(4, 2)
    assert torch.allclose(grid[0, 0], torch.tensor([2 - 0.5, 1 - 0.5]))
    assert torch.allclose(grid[-1, -1], torch.tensor([-2 + 0.5, -1 + 0.5]))
    upstream_eft = grid_xy(32, 32, 1 - 1 / 256, -1 + 1 / 256, 1 - 1 / 256, -1 + 1 / 256)
    assert torch.allclose(upstream_eft[0, 0], torch.tensor([255 / 256, 255 / 256]))


def test_monte_carlo_rays_lie_in_the_box_and_are_reproducible():
    cameras = PerspectiveCameras.identity(3)
    bundle = monte_carlo_rays(cameras, 100, -0.5, 0.5, -0.2, 0.1, 1.0, 2.0, 3, generator=torch.Generator().manual_seed(1))
    assert bundle.xys.shape == (3, 100, 2) and bundle.lengths.shape == (3, 100, 3)
    assert (bundle.xys[..., 0].abs() <= 0.5).all() and (bundle.xys[..., 1] >= -0.2).all() and (bundle.xys[..., 1] <= 0.1).all()
    again = monte_carlo_rays(cameras, 100, -0.5, 0.5, -0.2, 0.1, 1.0, 2.0, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bundle.xys, again.xys)
    # identity camera: direction = (x, y, 1) for NDC (x, y) with f = 1
    assert torch.allclose(bundle.directions, torch.cat([bundle.xys, torch.ones(3, 100, 1)], dim=-1))


def test_stratified_lengths_stay_in_their_bins():
    cameras = PerspectiveCameras.identity(1)
    bundle = grid_rays(cameras, 4, 4, 2.0, 6.0, 5, stratified=True, unit_directions=True)
    lengths = bundle.lengths.reshape(-1, 5)
    assert (lengths[:, 1:] >= lengths[:, :-1]).all() and (lengths >= 2.0).all() and (lengths <= 6.0).all()
    assert torch.allclose(bundle.directions.norm(dim=-1), torch.ones(1, 4, 4))


def test_harmonic_embedding_matches_its_definition():
    embed = HarmonicEmbedding(n_harmonic_functions=3, omega_0=0.5)
    x = torch.randn(4, 2)
    out = embed(x)
    assert out.shape == (4, 2 * 7) == (4, embed.output_dim(2))
    freqs = 0.5 * torch.tensor([1.0, 2.0, 4.0])
    phases = torch.cat([x[:, d:d + 1] * freqs for d in range(2)], dim=1)  # dimension-major
    assert torch.allclose(out[:, :6], torch.sin(phases)) and torch.allclose(out[:, 6:12], torch.cos(phases))
    assert torch.equal(out[:, 12:], x)
    assert "_frequencies" not in embed.state_dict()

import math

import pytest
import torch

from sparsefusion.camera_path import circle_path, fit_circle_2d, nearest_point_to_rays
from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform, ndc_to_screen, screen_to_ndc
from sparsefusion.relative_cameras import relative_cameras, sample_query_and_context


def random_rotations(n, dtype=torch.float64):
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]
    return q * torch.linalg.det(q)[:, None, None]


def random_cameras(n, dtype=torch.float64):
    return PerspectiveCameras(
        R=random_rotations(n, dtype),
        T=torch.randn(n, 3, dtype=dtype) + torch.tensor([0, 0, 6.0], dtype=dtype),
        focal_length=torch.rand(n, 2, dtype=dtype) + 1.5,
        principal_point=torch.rand(n, 2, dtype=dtype) * 0.2 - 0.1,
        image_size=torch.tensor([[240.0, 320.0]], dtype=dtype).expand(n, 2),
    )


def test_conventions_of_the_identity_camera():
    camera = PerspectiveCameras.identity(focal_length=2.0, dtype=torch.float64)
    ndc = camera.transform_points_ndc(torch.tensor([[[1.0, 0.5, 4.0]]], dtype=torch.float64))
    # +X left, +Y up in NDC means x_ndc = f·X/Z without a flip; the third coordinate is 1/Z
    assert torch.allclose(ndc, torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64))
    # the NDC point (1, 1) is the top-left corner of the image: screen (0, 0) for a square image
    corner = ndc_to_screen(torch.tensor([1.0, 1.0]), torch.tensor([256.0, 256.0]))
    assert torch.allclose(corner, torch.zeros(2))


def test_points_in_front_project_inside_ndc_and_unproject_back():
    cameras = random_cameras(4)
    view = torch.rand(4, 50, 3, dtype=torch.float64) * torch.tensor([0.4, 0.4, 3.0], dtype=torch.float64)
    view[..., :2] -= 0.2
    view[..., 2] += 2.0
    world = cameras.view_to_world(view)
    ndc = cameras.transform_points_ndc(world)
    assert (ndc[..., :2].abs() < 1.0).all()
    back = cameras.unproject_points(torch.cat([ndc[..., :2], 1.0 / ndc[..., 2:]], dim=-1))
    assert torch.allclose(back, world, atol=1e-10)


def test_camera_centre_maps_to_view_origin_and_screen_round_trip():
    cameras = random_cameras(3)
    centres = cameras.get_camera_center()
    assert torch.allclose(cameras.world_to_view(centres[:, None])[:, 0], torch.zeros(3, 3, dtype=torch.float64), atol=1e-10)
    xy = torch.rand(3, 7, 2, dtype=torch.float64)
    size = cameras.image_size[:, None, :]
    assert torch.allclose(screen_to_ndc(ndc_to_screen(xy, size), size), xy)


def test_indexing_concatenation_and_moves():
    cameras = random_cameras(5)
    picked = cameras[torch.tensor([4, 1])]
    assert torch.equal(picked.T, cameras.T[[4, 1]]) and len(cameras[2]) == 1
    joined = PerspectiveCameras.cat([cameras[:2], cameras[2:]])
    assert torch.equal(joined.R, cameras.R)
    assert cameras.to(torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="focal_length"):
        PerspectiveCameras(cameras.R, cameras.T, cameras.focal_length[:, :1], cameras.principal_point, cameras.image_size)


def test_look_at_puts_target_on_the_optical_axis_with_up_upwards():
    eye = torch.tensor([[3.0, 1.0, -2.0]], dtype=torch.float64)
    at = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    R, T = look_at_view_transform(eye, at, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    camera = PerspectiveCameras(R, T, torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                                torch.full((1, 2), 64.0, dtype=torch.float64))
    target_view = camera.world_to_view(at[:, None])[0, 0]
    assert torch.allclose(target_view[:2], torch.zeros(2, dtype=torch.float64), atol=1e-10) and target_view[2] > 0
    above = camera.world_to_view((eye + torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))[:, None])[0, 0]
    assert above[1] > 0  # world up is view +Y


@pytest.mark.parametrize("center_at_origin", [False, True])
def test_relative_cameras_keep_relative_poses(center_at_origin):
    cameras = random_cameras(5)
    rel = relative_cameras(cameras, 2, center_at_origin)
    assert torch.allclose(rel.R[2], torch.eye(3, dtype=torch.float64), atol=1e-10)
    expected_t = torch.zeros(3, dtype=torch.float64) if center_at_origin else cameras.T[2]
    assert torch.allclose(rel.T[2], expected_t, atol=1e-10)

    def relative_pose(cams, i, j):  # view_j from view_i, as a 4x4 matrix for row vectors
        m = cams.get_world_to_view_transform()
        return torch.linalg.inv(m[i]) @ m[j]

    for i, j in [(0, 1), (3, 4), (2, 0)]:
        assert torch.allclose(relative_pose(rel, i, j), relative_pose(cameras, i, j), atol=1e-10)


def test_sampling_query_and_context_draws_in_upstream_order():
    cameras, images = random_cameras(6), torch.rand(6, 3, 8, 8)
    generator = torch.Generator().manual_seed(3)
    sample = sample_query_and_context(cameras, images, context_size=3, generator=generator)
    replay = torch.Generator().manual_seed(3)
    assert torch.equal(sample.query_index, torch.randperm(6, generator=replay)[:1])
    assert torch.equal(sample.context_index, torch.randperm(6, generator=replay)[:3])
    assert torch.equal(sample.context_images, images[sample.context_index])
    assert torch.allclose(sample.query_cameras.R[0], torch.eye(3, dtype=torch.float64), atol=1e-10)


def orbit_cameras(n, radius=4.0, height=1.0, dtype=torch.float64):
    """Cameras on a tilted circle around the origin, looking at the origin."""
    tilt = random_rotations(1, dtype)[0]
    angles = torch.linspace(0, 1.5 * math.pi, n, dtype=dtype)
    centres = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles), torch.full_like(angles, height)], 1)
    centres = centres @ tilt.T
    normal = tilt @ torch.tensor([0, 0, 1.0], dtype=dtype)
    R, T = look_at_view_transform(centres, torch.zeros(1, 3, dtype=dtype), normal[None])
    intr = dict(focal_length=torch.full((n, 2), 2.0, dtype=dtype), principal_point=torch.zeros(n, 2, dtype=dtype),
                image_size=torch.full((n, 2), 64.0, dtype=dtype))
    return PerspectiveCameras(R=R, T=T, **intr), tilt @ torch.tensor([0, 0, height], dtype=dtype), radius


def test_circle_fit_and_path_reproduce_the_orbit():
    angles = torch.tensor([0.0, 1.0, 2.0, 4.0, 5.5], dtype=torch.float64)
    xc, yc, r = fit_circle_2d(1.0 + 2.0 * torch.cos(angles), -0.5 + 2.0 * torch.sin(angles))
    assert torch.allclose(torch.stack([xc, yc, r]), torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))

    cameras, circle_centre, radius = orbit_cameras(12)
    path = circle_path(cameras, n=30)
    centres = path.get_camera_center()
    assert torch.allclose((centres - circle_centre).norm(dim=1), torch.full((30,), radius, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(centres[0], cameras.get_camera_center()[0], atol=1e-6)  # starts at the first camera
    # the cameras look at the point nearest to the principal rays: here the origin
    origin_in_view = path.world_to_view(torch.zeros(1, 3, dtype=torch.float64))
    assert torch.allclose(origin_in_view[:, 0, :2], torch.zeros(30, 2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(path.focal_length, cameras.focal_length[:1].expand(30, 2))


def test_jittered_path_moves_centres_by_a_bounded_angle():
    cameras, _, _ = orbit_cameras(12)
    plain = circle_path(cameras, n=20).get_camera_center()
    jittered = circle_path(cameras, n=20, theta_offset_max=0.2, generator=torch.Generator().manual_seed(0))
    moved = jittered.get_camera_center()
    cosine = torch.nn.functional.cosine_similarity(plain, moved, dim=1)
    assert (cosine < 1 - 1e-8).any() and (cosine > math.cos(0.2) - 1e-6).all()


def test_nearest_point_to_rays_is_their_intersection():
    point = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    origins = point - 3.0 * directions
    assert torch.allclose(nearest_point_to_rays(origins, directions), point, atol=1e-10)

import math

import numpy as np
import pytest
import torch

from sparsefusion.external.nerf_network import NeRFConfig, NeRFNetwork, StackedNeRF, density_blob, trunc_exp
from sparsefusion.external.nerf_renderer import (
    NeRFRenderConfig,
    near_far_from_aabb,
    render,
    sample_pdf,
    weights_from_alphas,
)
from sparsefusion.checkpoint import load_state_dict_strict, save_atomic
from sparsefusion.errors import UserError
from sparsefusion.mesh import export_mesh, extract_mesh, main as mesh_main

BOX = torch.tensor([-4.0, -4.0, -4.0, 4.0, 4.0, 4.0])

# upstream's NeRFNetwork(opt) state dict with opt.bound = 4 (torch-ngp 'tiledgrid', log2 table 16)
UPSTREAM_KEYS = {
    "aabb_train": (6,),
    "aabb_infer": (6,),
    "encoder.embeddings": (929336, 2),
    "encoder.offsets": (17,),
    "sigma_net.net.0.weight": (64, 32),
    "sigma_net.net.0.bias": (64,),
    "sigma_net.net.1.weight": (64, 64),
    "sigma_net.net.1.bias": (64,),
    "sigma_net.net.2.weight": (4, 64),
    "sigma_net.net.2.bias": (4,),
}


def slab_field(density, color):
    """Field with constant density inside |z| < 1, none outside, and one colour everywhere."""
    def field(points):
        inside = points[:, 2].abs() < 1
        return density * inside.float(), torch.tensor(color).expand(len(points), 3)
    return field


def test_state_dict_has_upstream_names_and_shapes():
    with torch.device("meta"):
        network = NeRFNetwork()
    assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == UPSTREAM_KEYS
    assert network.state_dict()["encoder.offsets"].dtype == torch.int32


def test_upstream_style_checkpoint_loads_strictly():
    network = NeRFNetwork(NeRFConfig(grid_backend="torch"))
    theirs = {k: torch.randn(shape) for k, shape in UPSTREAM_KEYS.items()}
    theirs["encoder.offsets"] = network.encoder.offsets.clone()
    load_state_dict_strict(network, theirs, "upstream NeRF checkpoint")
    assert torch.equal(network.encoder.embeddings, theirs["encoder.embeddings"])
    with pytest.raises(UserError, match="missing \\[aabb_infer\\]"):
        load_state_dict_strict(network, {k: v for k, v in theirs.items() if k != "aabb_infer"}, "ckpt")


def test_parameter_groups_give_the_grid_ten_times_the_rate():
    network = NeRFNetwork()
    groups = network.get_params(5e-4)
    assert [g["lr"] for g in groups] == [5e-3, 5e-4]
    assert groups[0]["params"] == [network.encoder.embeddings]
    assert len(groups[1]["params"]) == 6


def test_trunc_exp_clamps_only_the_gradient():
    x = torch.tensor([0.5, 20.0, -30.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.allclose(y, torch.exp(x.detach()))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.exp(torch.tensor([0.5, 15.0, -15.0])))


def test_density_is_the_centre_blob_when_the_mlp_outputs_zero():
    network = NeRFNetwork(NeRFConfig(grid_backend="torch"))
    torch.nn.init.zeros_(network.sigma_net.net[2].weight)
    torch.nn.init.zeros_(network.sigma_net.net[2].bias)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [1.0, 1.0, 1.0]])
    density, albedo = network(points)
    expected = torch.exp(5 * torch.exp(-(points**2).sum(-1) / (2 * 0.2**2)))
    assert torch.allclose(density, expected) and density[0].item() == pytest.approx(math.exp(5))
    assert torch.equal(albedo, torch.full((3, 3), 0.5))
    assert torch.allclose(density_blob(points, 5.0, 0.2).exp(), expected)


def test_near_far_from_the_box():
    rays_o = torch.tensor([[0.0, 0.0, -10.0], [0.0, 0.0, -10.0], [1.0, 2.0, 0.5], [0.0, 0.0, -10.0], [3.0, 9.0, 0.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.28, 0.0, 0.96], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]])
    near, far = near_far_from_aabb(rays_o, rays_d, BOX, min_near=0.1)
    # straight through; in at z = −4 and out through the side x = 4; from inside (near clamped to min_near)
    assert near[:3].tolist() == pytest.approx([6.0, 6.25, 0.1])
    assert far[:3].tolist() == pytest.approx([14.0, 4 / 0.28, 3.0])
    # the last two miss the box: nothing to integrate
    assert near[3:].tolist() == pytest.approx([0.1, 0.1]) and far[3:].tolist() == pytest.approx([0.1, 0.1])


def test_weights_of_constant_opacity_are_geometric():
    alphas = torch.full((1, 6), 0.3, dtype=torch.float64)
    expected = 0.3 * (0.7 + 1e-15) ** torch.arange(6, dtype=torch.float64)
    assert torch.allclose(weights_from_alphas(alphas)[0], expected, rtol=1e-12)


@pytest.mark.parametrize("alpha_high", [0.9, 1.0])  # 1.0: opaque samples, factors 1e-15, products underflowing to 0
def test_weights_take_pytorchs_cumprod_gradient_without_a_host_sync(alpha_high):
    """The transmittance's own cumprod (capturable in a CUDA graph) has torch.cumprod's values and gradients."""
    generator = torch.Generator().manual_seed(0)
    alphas = torch.rand(5, 40, generator=generator) * alpha_high
    alphas[:, 10:15] = alpha_high
    cotangent = torch.randn(5, 40, generator=generator)
    ours = alphas.clone().requires_grad_()
    theirs = alphas.clone().requires_grad_()
    reference = theirs * torch.cat([torch.ones(5, 1), torch.cumprod(1 - theirs + 1e-15, dim=-1)[:, :-1]], dim=-1)
    (weights_from_alphas(ours) * cotangent).sum().backward()
    (reference * cotangent).sum().backward()
    assert torch.equal(weights_from_alphas(alphas), reference.detach())
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0)
    double = torch.rand(2, 6, dtype=torch.float64, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(weights_from_alphas, (double,))


def closed_form_slab(sigma, near, far, enter, leave):
    """Opacity and upstream's normalised depth of a slab of density sigma between ray depths enter and leave."""
    length = leave - enter
    opacity = 1 - math.exp(-sigma * length)
    # ∫ (t − near) σ e^{−σ(t − enter)} dt over the slab, divided by far − near
    inner = 1 / sigma - math.exp(-sigma * length) * (length + 1 / sigma)
    return opacity, ((enter - near) * opacity + inner) / (far - near)


@pytest.mark.parametrize("config,tolerance", [
    (NeRFRenderConfig(num_steps=4000, upsample_steps=0), 2e-3),
    (NeRFRenderConfig(), 3e-2),
])
def test_constant_density_slab_matches_closed_form_transmittance(config, tolerance):
    rays_o = torch.tensor([[0.3, -0.2, -10.0], [0.0, 0.0, -10.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])  # the second misses the box
    out = render(slab_field(0.5, [0.2, 0.4, 0.6]), rays_o, rays_d, BOX, config, bg_color=torch.tensor([1.0, 0.0, 0.0]),
                 deterministic_pdf=True)
    # the first ray crosses the slab from t = 9 to 11, inside the box from near 6 to far 14
    opacity, depth = closed_form_slab(0.5, 6.0, 14.0, 9.0, 11.0)
    assert out["weights_sum"][0].item() == pytest.approx(opacity, abs=tolerance)
    assert out["depth"][0].item() == pytest.approx(depth, abs=tolerance)
    expected_image = opacity * torch.tensor([0.2, 0.4, 0.6]) + (1 - opacity) * torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(out["image"][0], expected_image, atol=tolerance)
    assert out["weights_sum"][1].item() == 0 and torch.equal(out["image"][1], torch.tensor([1.0, 0.0, 0.0]))


def test_sample_pdf_draws_in_proportion_to_the_weights():
    bins = torch.linspace(0, 4, 5).expand(1, 5)
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    generator = torch.Generator().manual_seed(0)
    samples = sample_pdf(bins, weights, 20000, generator=generator)
    fractions = torch.histc(samples, bins=4, min=0, max=4) / 20000
    assert torch.allclose(fractions, weights[0] / 10, atol=0.015)
    only_third = sample_pdf(bins, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), 16, deterministic=True)
    assert ((only_third > 2.0) & (only_third < 3.0)).all()
    uniform = sample_pdf(bins, torch.ones(1, 4), 4, deterministic=True)
    assert torch.allclose(uniform, torch.tensor([[0.5, 1.5, 2.5, 3.5]]), atol=1e-3)


def small_network(**overrides):
    """A NeRF with a coarse 8-level grid (finest resolution 256), cheap enough to fit on a CPU in a test."""
    return NeRFNetwork(NeRFConfig(num_levels=8, desired_resolution=256,
                                  grid_backend="torch", **overrides))


def test_chunked_rendering_equals_rendering_at_once():
    network = small_network().eval()
    rays_o = torch.tensor([0.0, -7.0, 0.5]).expand(150, 3)
    rays_d = torch.nn.functional.normalize(torch.randn(150, 3) * 0.2 + torch.tensor([0.0, 1.0, 0.0]), dim=-1)
    with torch.no_grad():
        whole = network.render(rays_o, rays_d)
        chunked = network.render(rays_o.reshape(3, 50, 3), rays_d.reshape(3, 50, 3),
                                 NeRFRenderConfig(max_ray_batch=64), staged=True)
    for key in ("image", "depth", "weights_sum"):
        assert torch.allclose(whole[key], chunked[key].reshape(whole[key].shape), atol=1e-6)
    assert chunked["image"].shape == (3, 50, 3) and chunked["weights_sum"].shape == (3, 50)


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
])
def test_autocast_rendering_stays_finite_and_close(device, dtype):
    network = small_network().to(device).train()
    rays_o = torch.tensor([0.0, -7.0, 0.5], device=device).expand(128, 3)
    rays_d = torch.nn.functional.normalize(torch.randn(128, 3, device=device) * 0.2
                                           + torch.tensor([0.0, 1.0, 0.0], device=device), dim=-1)
    generator = torch.Generator(device).manual_seed(0)
    full = network.render(rays_o, rays_d, perturb=True, bg_color=0, generator=generator)
    generator.manual_seed(0)
    with torch.autocast(device, dtype=dtype):
        mixed = network.render(rays_o, rays_d, perturb=True, bg_color=0, generator=generator)
    mixed["image"].mean().backward()
    assert all(torch.isfinite(v).all() for v in mixed.values() if v.is_floating_point())
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())
    assert mixed["image"].dtype == torch.float32
    assert (mixed["image"] - full["image"]).abs().max() < 0.05


def look_at_rays(eye, size, focal):
    """Rays (size, size, 3) of a pinhole camera at eye looking at the origin, z up."""
    eye = torch.tensor(eye, dtype=torch.float32)
    forward = -eye / eye.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    pixels = (torch.arange(size) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(-pixels, pixels, indexing="ij")
    directions = forward + (u[..., None] * right + v[..., None] * up) / focal
    return eye.expand(size, size, 3), directions / directions.norm(dim=-1, keepdim=True)


def coloured_sphere(rays_o, rays_d, radius=1.5):
    """Image (..., 3) of a sphere at the origin whose colour varies over its surface, on black."""
    b = (rays_o * rays_d).sum(-1)
    disc = b**2 - ((rays_o**2).sum(-1) - radius**2)
    hit = disc > 0
    normal = (rays_o + (-b - disc.clamp_min(0).sqrt())[..., None] * rays_d) / radius
    color = torch.stack([0.5 + 0.5 * normal[..., 0], 0.5 + 0.4 * torch.sin(3 * normal[..., 2]),
                         0.5 - 0.5 * normal[..., 1]], dim=-1)
    return torch.where(hit[..., None], color, torch.zeros_like(color))


def psnr(image, target):
    return -10 * math.log10(((image - target) ** 2).mean().item())


def test_nerf_fits_eight_views_of_a_synthetic_scene():
    views = []
    for k in range(9):  # eight training views around the sphere, the ninth between two of them
        azimuth = 2 * math.pi * k / 8 + (math.pi / 8 if k == 8 else 0)
        elevation = 0.3 * math.sin(3 * k) if k < 8 else 0.15
        eye = 6 * torch.tensor([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                                math.sin(elevation)])
        rays_o, rays_d = look_at_rays(eye.tolist(), 64, focal=1.6)
        views.append((rays_o, rays_d, coloured_sphere(rays_o, rays_d)))
    train_o, train_d, train_rgb = (torch.cat([v[i].reshape(-1, 3) for v in views[:8]]) for i in range(3))
    test_o, test_d, test_rgb = views[8]

    network = small_network()
    optimizer = torch.optim.Adam(network.get_params(3e-3), betas=(0.9, 0.99), eps=1e-15)
    config = NeRFRenderConfig(num_steps=24, upsample_steps=24)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(0, len(train_o), (256,), generator=generator)
        out = network.render(train_o[batch], train_d[batch], config, perturb=True, bg_color=0, generator=generator)
        loss = ((out["image"] - train_rgb[batch]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        rendered = network.render(test_o, test_d, config, staged=True, bg_color=0)["image"]
    baseline = psnr(train_rgb.mean(dim=0).expand_as(test_rgb), test_rgb)
    assert psnr(rendered, test_rgb) > baseline + 8, (psnr(rendered, test_rgb), baseline)


def sphere_field(radius=1.5):
    """Field whose density is 100 well inside a sphere and falls smoothly to 0 outside; albedo = position/8 + ½."""
    def field(points):
        return 100 * torch.sigmoid((radius - points.norm(dim=-1)) * 20), (points / 8 + 0.5).clamp(0, 1)
    return field


def test_mesh_of_a_sphere_has_the_threshold_radius_outward_faces_and_albedo_colours():
    vertices, faces, colors = extract_mesh(sphere_field(), bound=4.0, resolution=64, threshold=10.0)
    radius = 1.5 + math.log(9) / 20  # 100·sigmoid(20(1.5 − r)) = 10
    spacing = 8 / 63  # linear interpolation of the steep profile between grid points: within a third of a cell
    assert np.abs(np.linalg.norm(vertices, axis=1) - radius).max() < spacing / 3
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    assert (np.sum(normals * vertices[faces].mean(axis=1), axis=1) > 0).all()
    expected = np.round(np.clip(vertices / 8 + 0.5, 0, 1) * 255)
    assert np.abs(colors.astype(float) - expected).max() <= 1


def test_mesh_files_round_trip(tmp_path):
    vertices, faces, colors = extract_mesh(sphere_field(), bound=4.0, resolution=32, threshold=10.0)
    ply = export_mesh(sphere_field(), tmp_path / "m.ply", bound=4.0, resolution=32, threshold=10.0)
    data = ply.read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert f"element vertex {len(vertices)}".encode() in header and f"element face {len(faces)}".encode() in header
    rows = np.frombuffer(body[: len(vertices) * 15], dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    assert np.array_equal(rows["xyz"], vertices) and np.array_equal(rows["rgb"], colors)
    faces_back = np.frombuffer(body[len(vertices) * 15:], dtype=[("n", "u1"), ("ids", "<i4", 3)])
    assert (faces_back["n"] == 3).all() and np.array_equal(faces_back["ids"], faces)

    obj = export_mesh(sphere_field(), tmp_path / "m.obj", bound=4.0, resolution=32, threshold=10.0)
    lines = obj.read_text().splitlines()
    v_rows = np.array([[float(t) for t in line.split()[1:]] for line in lines if line.startswith("v ")])
    f_rows = np.array([[int(t) for t in line.split()[1:]] for line in lines if line.startswith("f ")])
    assert np.allclose(v_rows[:, :3], vertices, atol=1e-6) and np.allclose(v_rows[:, 3:] * 255, colors, atol=0.02)
    assert np.array_equal(f_rows - 1, faces)

    with pytest.raises(UserError, match="must end in .ply or .obj"):
        export_mesh(sphere_field(), tmp_path / "m.stl", bound=4.0, resolution=16)
    with pytest.raises(UserError, match="no surface at density threshold 500"):
        export_mesh(sphere_field(), tmp_path / "m.ply", bound=4.0, resolution=16, threshold=500)


def test_mesh_command_exports_a_saved_nerf(tmp_path, capsys):
    network = NeRFNetwork()  # untrained: its surface is the centre blob, density e^5 at 0, 10 at radius ≈ 0.25
    checkpoint = save_atomic({"model_state_dict": network.state_dict()}, tmp_path / "scene.pt")
    mesh_main([str(checkpoint), str(tmp_path / "scene.ply"), "--resolution", "49", "--device", "cpu"])
    assert "wrote" in capsys.readouterr().out
    header = (tmp_path / "scene.ply").read_bytes().split(b"end_header")[0].decode()
    assert int(header.split("element vertex ")[1].split()[0]) > 20
    with pytest.raises(SystemExit) as stop:
        mesh_main([str(tmp_path / "missing.pt"), str(tmp_path / "x.ply")])
    assert stop.value.code == 2
    with pytest.raises(SystemExit):  # the hint names this command's flag (demo.py's is --mesh_threshold)
        mesh_main([str(checkpoint), str(tmp_path / "x.ply"), "--resolution", "9", "--device", "cpu", "--threshold", "1e9"])
    assert capsys.readouterr().err.strip().endswith("pass a threshold between them with --threshold")


def small_nerfs(scenes, **options):
    config = NeRFConfig(num_levels=4, base_resolution=8, desired_resolution=64, log2_hashmap_size=12, hidden_dim=16,
                        grid_backend="torch", **options)
    networks = []
    for scene in range(scenes):
        torch.manual_seed(scene)
        network = NeRFNetwork(config)
        for parameter in network.sigma_net.parameters():  # a non-trivial field, different per scene
            torch.nn.init.normal_(parameter, std=0.5)
        torch.nn.init.normal_(network.encoder.embeddings, std=0.5)
        networks.append(network)
    return networks


def test_a_stacked_nerf_renders_each_scene_as_its_network_alone_with_its_own_draws():
    """One render call over 3 scenes' rays (one generator per scene) gives each scene what its NeRFNetwork renders
    alone with that generator; gradients reach each scene's own parameters only, as they would alone."""
    networks = small_nerfs(3)
    stacked = StackedNeRF(networks)
    rays_o = torch.tensor([0.0, 0.0, -6.0]) + 0.3 * torch.randn(3, 20, 3)
    rays_d = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, 1.0]) + 0.2 * torch.randn(3, 20, 3), dim=-1)
    config = NeRFRenderConfig(num_steps=8, upsample_steps=8)
    generators = [torch.Generator().manual_seed(20 + s) for s in range(3)]
    out = stacked.render(rays_o.flatten(0, 1), rays_d.flatten(0, 1), config=config, perturb=True,
                         generator=generators)
    (out["image"].square().sum() + out["weights_sum"].sum()).backward()
    for s, network in enumerate(networks):
        alone = network.render(rays_o[s], rays_d[s], config=config, perturb=True,
                               generator=torch.Generator().manual_seed(20 + s))
        (alone["image"].square().sum() + alone["weights_sum"].sum()).backward()
        for key in alone:  # float32: the batched matmul may round differently from nn.Linear
            torch.testing.assert_close(out[key][20 * s:20 * (s + 1)], alone[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked.encoder.embeddings.grad.view(3, -1, 2)[s], network.encoder.embeddings.grad,
                                   rtol=1e-4, atol=1e-7)
        for i, layer in enumerate(network.sigma_net.net):
            torch.testing.assert_close(stacked.weights[i].grad[s], layer.weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stacked.biases[i].grad[s], layer.bias.grad, rtol=1e-4, atol=1e-6)


def test_a_stacked_nerf_exports_each_scene_as_an_upstream_state_dict():
    networks = small_nerfs(2)
    stacked = StackedNeRF(networks)
    groups = stacked.get_params(1e-3)
    assert [group["lr"] for group in groups] == [1e-2, 1e-3]
    assert sum(p.numel() for group in groups for p in group["params"]) == sum(p.numel() for p in stacked.parameters())
    for s, network in enumerate(networks):
        state = stacked.scene_state_dict(s)
        expected = network.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[key], expected[key]) for key in expected)
        fresh = NeRFNetwork(network.config)
        load_state_dict_strict(fresh, state, "scene")
    with pytest.raises(ValueError, match="one configuration"):
        StackedNeRF([networks[0], small_nerfs(1, bound=2.0)[0]])

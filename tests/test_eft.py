import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, load_backbone_weights, load_eft, save_eft
from sparsefusion.eft_render import (FeatureRenderConfig, eft_mode, feature_cache, feature_grid_xy, render_features)
from sparsefusion.errors import UserError
from sparsefusion.rays import grid_rays, grid_xy, monte_carlo_rays
from sparsefusion.relative_cameras import relative_cameras

KEYS_TSV = Path(__file__).parent / "data" / "keys_ckpt_latest_eft.tsv"  # the released checkpoint's keys and shapes
TINY = EFTConfig(hidden_dim=32, n_layers=1, backbone_weights="random")
UNUSED_BACKBONE = ("encoder_model.layer4.", "encoder_model.fc.")  # stored, never used, as upstream




@pytest.fixture(scope="module")
def full_eft():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return EpipolarFeatureTransformer(EFTConfig(backbone_weights="random")).eval()


# --- a tiny analytic scene: coloured spheres seen from cameras on a circle ---

def circle_cameras(angles, image_size, radius=4.0, height=1.5, focal=2.0):
    eye = torch.stack([radius * torch.cos(angles), torch.full_like(angles, height), radius * torch.sin(angles)], -1)
    R, T = look_at_view_transform(eye, torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))
    n = len(angles)
    return PerspectiveCameras(R=R, T=T, focal_length=torch.full((n, 2), focal), principal_point=torch.zeros(n, 2),
                              image_size=torch.full((n, 2), float(image_size)))


def random_spheres(generator, n=3):
    return dict(centres=(torch.rand(n, 3, generator=generator) - 0.5) * 1.6,
                radii=0.35 + 0.3 * torch.rand(n, generator=generator),
                colours=0.2 + 0.8 * torch.rand(n, 3, generator=generator))


def ray_cast(spheres, origins, directions):
    """Colour (..., 3) of the nearest sphere hit by each ray, black where none is."""
    d = F.normalize(directions, dim=-1)
    offset = origins[..., None, :] - spheres["centres"]  # (..., S, 3)
    b = (offset * d[..., None, :]).sum(-1)
    disc = b ** 2 - (offset ** 2).sum(-1) + spheres["radii"] ** 2
    t = -b - disc.clamp(min=0).sqrt()
    t = torch.where((disc > 0) & (t > 0), t, torch.full_like(t, math.inf))
    nearest, index = t.min(-1)
    return torch.where(nearest.isfinite()[..., None], spheres["colours"][index], torch.zeros_like(origins))


def photograph(spheres, cameras, size):
    rays = grid_rays(cameras, size, size, 1.0, 2.0, 1)
    return ray_cast(spheres, rays.origins, rays.directions).permute(0, 3, 1, 2)


def scene(n_views=5, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cameras = circle_cameras(torch.linspace(0.0, 2.0, n_views), size)
    spheres = random_spheres(generator)
    return cameras, photograph(spheres, cameras, size), spheres


def tiny_model(config=TINY):
    return EpipolarFeatureTransformer(config)


# --- layout of the released checkpoint ---

def test_state_dict_matches_the_released_checkpoint_keys_shapes_and_dtypes():
    with torch.device("meta"):
        model = EpipolarFeatureTransformer(EFTConfig(backbone_weights="random"))
    rows = [line.rstrip("\n").split("\t") for line in open(KEYS_TSV)][1:]
    expected = [(key, shape, dtype) for key, shape, dtype, _ in rows]
    ours = [(key, str(tuple(v.shape)), str(v.dtype).removeprefix("torch."))
            for key, v in model.state_dict().items()]
    assert ours == expected
    assert len(ours) == 278 and sum(v.numel() for v in model.state_dict().values()) == 16_819_905
    assert "harmonic_embedding._frequencies" not in model.state_dict()


def test_constructor_encode_moves_batch_norm_statistics_like_upstream():
    model = tiny_model()
    buffers = model.state_dict()
    for prefix in ["encoder_model.bn1", "encoder_model.layer1.0.bn1", "encoder_model.layer3.1.bn2"]:
        assert torch.allclose(buffers[f"{prefix}.running_var"], torch.full_like(buffers[f"{prefix}.running_var"], 0.9))
        assert buffers[f"{prefix}.num_batches_tracked"] == 1
    assert torch.equal(buffers["encoder_model.layer4.0.bn1.running_var"], torch.ones(512))
    assert buffers["encoder_model.layer4.0.bn1.num_batches_tracked"] == 0


# --- behaviour of the forward pass ---

def test_output_shapes_for_grid_and_random_rays():
    cameras, images, _ = scene(n_views=5)
    model = tiny_model().eval()
    context = model.encode(images[:3])
    assert context.latents.shape == (3, 512, 16, 16)
    grid = grid_rays(cameras[3:], 4, 5, 2.5, 5.5, 6)
    out = model(grid, cameras[:3], context)
    assert out.rgb.shape == (2, 5, 4, 3) and out.features.shape == (2, 5, 4, 32) and out.coarse_rgb.shape == (2, 5, 4, 3)
    assert out.packed().shape == (2, 5, 4, 35)
    assert (out.rgb >= 0).all() and (out.rgb <= 1).all()
    random = monte_carlo_rays(cameras[3:], 7, -1, 1, -1, 1, 2.5, 5.5, 6)
    assert model(random, cameras[:3], context).features.shape == (2, 7, 32)
    config = FeatureRenderConfig(image_size=32, scale=4, n_points=5, mode="eval", views_per_chunk=1)
    assert render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config).shape == (2, 8, 8, 35)


@pytest.mark.parametrize("mode", ["eval", "upstream"])
def test_permuting_the_context_views_leaves_outputs_unchanged(mode):
    cameras, images, _ = scene(n_views=5)
    model = tiny_model(EFTConfig(hidden_dim=32, n_layers=2, dropout=0.0, backbone_weights="random"))
    rays = grid_rays(cameras[3:], 4, 4, 2.5, 5.5, 6)
    order = [2, 0, 1]
    with torch.no_grad(), eft_mode(model, mode):
        a = model(rays, cameras[:3], model.encode(images[:3]))
        b = model(rays, cameras[order], model.encode(images[order]))
    for x, y in [(a.rgb, b.rgb), (a.features, b.features), (a.coarse_rgb, b.coarse_rgb)]:
        assert torch.allclose(x, y, atol=1e-5)


def test_coarse_rgb_reproduces_the_context_image_when_the_query_is_that_view():
    cameras, _, _ = scene(n_views=2)
    image = torch.rand(1, 3, 9, 9)
    model = tiny_model().eval()
    # rays through NDC ±1 .. ∓1 in 9 steps land on pixel centres of a 9×9 image under align_corners=True
    xy = grid_xy(9, 9, 1.0, -1.0, 1.0, -1.0)
    rays = grid_rays(cameras[:1], 9, 9, 2.5, 5.5, 7, xy=xy)
    with torch.no_grad():
        out = model(rays, cameras[:1], model.encode(image))
    assert torch.allclose(out.coarse_rgb[0], image[0].permute(1, 2, 0), atol=1e-5)


def reference_forward(model, rays, cameras, images):
    """The EFT computed view by view in upstream's sequence-first layout: (rgb, features) per ray."""
    embed = model.harmonic_embedding
    origins, lengths = rays.origins.reshape(-1, 3), rays.lengths.reshape(-1, rays.lengths.shape[-1])
    directions = rays.directions.reshape(-1, 3)
    points = origins[:, None] + lengths[..., None] * directions[:, None]  # (N, P, 3)
    latents = model.encode(images).latents
    plucker = lambda o, d: embed(torch.cat([F.normalize(d, dim=-1), torch.cross(o, F.normalize(d, dim=-1), dim=-1)], -1))
    feats, refs = [], []
    for v in range(len(cameras)):
        xy = cameras[v].transform_points_ndc(points.reshape(1, -1, 3))[0, :, :2]
        grid = -xy.reshape(1, -1, 1, 2)
        read = lambda m: F.grid_sample(m[v:v + 1], grid, align_corners=True, padding_mode="border")[0, :, :, 0].T
        feats.append(torch.cat([read(latents), read(images)], -1).reshape(*points.shape[:2], -1))
        centre = cameras[v].get_camera_center()[0]
        refs.append(plucker(centre.expand_as(points), points - centre))
    feats, refs = torch.stack(feats), torch.stack(refs)  # (V, N, P, ·)
    n_views, n_rays, n_points = feats.shape[:3]
    depths = embed(lengths[..., None])[None].expand(n_views, -1, -1, -1)
    query = plucker(origins, directions)[None, :, None].expand(n_views, -1, n_points, -1)
    # T1 in upstream's sequence-first layout (V, N·P, ·); our layers are batch-first
    t1_in = torch.cat([refs, depths, feats], -1).reshape(n_views, n_rays * n_points, -1)
    f1 = model.t1(t1_in.transpose(0, 1)).transpose(0, 1).reshape(n_views, n_rays, n_points, -1)
    t2_in = torch.cat([query, refs, depths, f1], -1).reshape(n_views * n_rays, n_points, -1)
    f2 = model.t2(t2_in).reshape(n_views, n_rays, n_points, -1)
    f2 = (f2 * torch.softmax(model.t2_attn(f2), dim=2)).sum(2)
    t3_in = torch.cat([query[:, :, 0], refs[:, :, n_points // 2], f2], -1)
    f3 = model.t3(t3_in.transpose(0, 1)).transpose(0, 1)
    f3 = (f3 * torch.softmax(model.t3_attn(f3), dim=0)).sum(0)
    return model.color_layer(f3), f3


def test_forward_matches_a_view_by_view_reference(full_eft):
    cameras, images, _ = scene(n_views=4, size=16)
    rays = grid_rays(cameras[3:], 3, 2, 2.5, 5.5, 5)
    with torch.no_grad():
        out = full_eft(rays, cameras[:3], full_eft.encode(images[:3]))
        rgb, features = reference_forward(full_eft, rays, cameras[:3], images[:3])
    assert torch.allclose(out.rgb.reshape(-1, 3), rgb, atol=1e-5)
    assert torch.allclose(out.features.reshape(-1, 256), features, atol=1e-4)


# --- checkpoints ---

def test_upstream_layout_checkpoint_loads_strictly_and_reproduces_outputs(full_eft, tmp_path):
    cameras, images, _ = scene(n_views=3, size=16)
    rays = grid_rays(cameras[2:], 2, 2, 2.5, 5.5, 4)
    path = tmp_path / "ckpt_latest_eft.pt"
    torch.save({"step": 123, "model_state_dict": full_eft.state_dict()}, path)
    loaded = load_eft(path).eval()
    with torch.no_grad():
        a = full_eft(rays, cameras[:2], full_eft.encode(images[:2]))
        b = loaded(rays, cameras[:2], loaded.encode(images[:2]))
    assert torch.equal(a.packed(), b.packed()) and torch.equal(a.coarse_rgb, b.coarse_rgb)
    ours = save_eft(loaded, tmp_path / "again.pt", step=5)
    again = torch.load(ours, weights_only=True)
    assert again["step"] == 5 and list(again["model_state_dict"]) == list(full_eft.state_dict())


def test_tampered_checkpoint_fails_naming_the_keys(full_eft, tmp_path):
    state = dict(full_eft.state_dict())
    del state["t2_attn.bias"]
    state["t4.pre.0.weight"] = torch.zeros(1)
    state["color_layer.0.weight"] = torch.zeros(4, 256)
    torch.save({"model_state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(UserError) as error:
        load_eft(tmp_path / "bad.pt")
    for key in ["t2_attn.bias", "t4.pre.0.weight", "color_layer.0.weight: expected (3, 256), got (4, 256)"]:
        assert key in str(error.value)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="model_state_dict"):
        load_eft(tmp_path / "foreign.pt")


def test_backbone_weights_load_from_a_path_and_warn_when_absent(tmp_path, monkeypatch):
    import torchvision
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    target = torchvision.models.resnet18(weights=None)
    assert load_backbone_weights(target, str(tmp_path / "resnet18.pth"))
    assert torch.equal(target.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    with pytest.warns(UserWarning, match="random init"):
        assert not load_backbone_weights(target, "auto")
    with pytest.raises(UserError):
        load_backbone_weights(target, str(tmp_path / "missing.pth"))


# --- training ---

def test_gradients_reach_every_used_parameter_in_training_mode():
    cameras, images, _ = scene(n_views=4)
    model = tiny_model().train()
    rays = monte_carlo_rays(cameras[3:], 6, -1, 1, -1, 1, 2.5, 5.5, 4)
    out = model(rays, cameras[:3], model.encode(images[:3]))
    (out.rgb.sum() + (out.features * torch.randn_like(out.features)).sum()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith(UNUSED_BACKBONE):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_small_eft_learns_to_predict_held_out_views_of_new_scenes():
    """~200 steps of a 1-layer, 128-wide EFT (frozen random backbone) beat the target's mean colour by > 2 dB."""
    model = tiny_model(EFTConfig(hidden_dim=128, n_layers=1, dropout=0.0, backbone_weights="random"))
    model.encoder_model.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1.5e-3)
    generator = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0.0, 0.8, 1.6, 0.4])

    def views(generator, jitter):
        spheres = random_spheres(generator)
        angles = offsets + 2 * math.pi * torch.rand(1, generator=generator) + jitter * torch.randn(4, generator=generator)
        cameras = circle_cameras(angles, 32)
        return spheres, cameras, photograph(spheres, cameras[:3], 32)

    for _ in range(200):
        spheres, cameras, images = views(generator, 0.1)
        rays = monte_carlo_rays(cameras[3:], 64, -1, 1, -1, 1, 2.5, 5.5, 10, generator=generator)
        with torch.no_grad():
            context = model.encode(images)
        loss = ((model(rays, cameras[:3], context).rgb - ray_cast(spheres, rays.origins, rays.directions)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    psnr = lambda error: -10 * torch.log10((error ** 2).mean())
    ours, baseline = [], []
    held_out = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _ in range(8):
            spheres, cameras, images = views(held_out, 0.0)
            rays = grid_rays(cameras[3:], 16, 16, 2.5, 5.5, 10)
            target = ray_cast(spheres, rays.origins, rays.directions)
            ours.append(psnr(model(rays, cameras[:3], model.encode(images)).rgb - target))
            baseline.append(psnr(target - target.mean(dim=(0, 1, 2))))
    assert torch.stack(ours).mean() > torch.stack(baseline).mean() + 2.0


# --- the renderer ---

def test_feature_grid_uses_the_256_pixel_half_pixel_offset():
    xy = feature_grid_xy(FeatureRenderConfig())
    assert xy.shape == (32, 32, 2)
    assert torch.allclose(xy[0, 0], torch.tensor([255 / 256, 255 / 256]))
    assert torch.allclose(xy[-1, -1], torch.tensor([-255 / 256, -255 / 256]))
    assert torch.allclose(xy[0, 1, 0] - xy[0, 0, 0], torch.tensor(-(2 - 2 / 256) / 31))


def test_upstream_mode_uses_batch_statistics_keeps_state_and_restores_flags():
    cameras, images, _ = scene(n_views=4)
    model = tiny_model(EFTConfig(hidden_dim=32, n_layers=1, dropout=0.0, backbone_weights="random"))
    model.eval()
    config = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="upstream")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.add_(3.0)
    b = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config)
    c = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, FeatureRenderConfig(
        image_size=32, scale=8, n_points=4, mode="eval"))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-2)


def test_upstream_mode_keeps_dropout_active():
    cameras, images, _ = scene(n_views=4)
    model = tiny_model()
    config = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="upstream")
    a = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config)
    b = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="mode"):
        FeatureRenderConfig(mode="train")


def rigidly_moved(cameras, rotation, translation):
    """The same cameras in a world moved by X' = X·rotation + translation (rows)."""
    R = rotation.T @ cameras.R
    T = cameras.T - (translation @ R)[:, 0]
    return PerspectiveCameras(R=R, T=T, focal_length=cameras.focal_length, principal_point=cameras.principal_point,
                              image_size=cameras.image_size)


def test_feature_cache_puts_each_query_in_its_own_frame_and_chunks_consistently():
    cameras, images, _ = scene(n_views=6)
    model = tiny_model().eval()
    config = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="eval", views_per_chunk=4)
    context_index = [0, 2, 4]
    cache = feature_cache(model, cameras, context_index, images[context_index], 2.5, 5.5, config=config)
    assert cache.features.shape == (6, 32, 4, 4) and cache.eft_images.shape == (6, 3, 32, 32)
    # re-expressed relative to each query, the cache ignores where the world's origin and axes are
    rotation = torch.linalg.qr(torch.randn(3, 3))[0]
    rotation = rotation * torch.det(rotation)
    moved = rigidly_moved(cameras, rotation, torch.tensor([[0.3, -1.0, 2.0]]))
    single = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="eval", views_per_chunk=1)
    again = feature_cache(model, moved, context_index, images[context_index], 2.5, 5.5, config=single)
    assert torch.allclose(cache.features, again.features, atol=1e-4)
    one = feature_cache(model, cameras, context_index, images[context_index], 2.5, 5.5, query_index=[3], config=config)
    assert torch.allclose(one.features, cache.features[3:4], atol=1e-5)
    # query 3's entry: its frame puts it at the origin; the EFT image is its RGB upsampled bilinearly ×8
    frame = relative_cameras(cameras, 3, center_at_origin=True)
    assert torch.allclose(frame.R[3], torch.eye(3), atol=1e-6) and torch.allclose(frame.T[3], torch.zeros(3), atol=1e-6)
    packed = render_features(model, frame[3], frame[context_index], images[context_index], 2.5, 5.5, config)
    rgb, features = packed.permute(0, 3, 1, 2).split([3, 32], dim=1)
    assert torch.allclose(features, cache.features[3:4], atol=1e-5)
    assert torch.allclose(cache.eft_images[3:4], F.interpolate(rgb, size=(32, 32), mode="bilinear"), atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32_on_cpu():
    cameras, images, _ = scene(n_views=4)
    model = tiny_model().eval()
    fp32 = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="eval")
    bf16 = FeatureRenderConfig(image_size=32, scale=8, n_points=4, mode="eval", precision="bf16")
    a = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, fp32)
    b = render_features(model, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, bf16)
    assert b.dtype == torch.float32
    assert (a - b).norm() / a.norm() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_rendering_matches_cpu_fp32(precision, full_eft):
    cameras, images, _ = scene(n_views=4, size=64)
    config = FeatureRenderConfig(image_size=64, scale=8, mode="eval")
    reference = render_features(full_eft, cameras[3:], cameras[:3], images[:3], 2.5, 5.5, config)
    model = EpipolarFeatureTransformer(EFTConfig(backbone_weights="random")).cuda()
    model.load_state_dict(full_eft.state_dict())
    gpu = FeatureRenderConfig(image_size=64, scale=8, mode="eval", precision=precision)
    out = render_features(model, cameras[3:].to("cuda"), cameras[:3].to("cuda"), images[:3].cuda(), 2.5, 5.5, gpu)
    tolerance = {"fp32": 1e-3, "bf16": 0.03, "fp16": 0.01}[precision]
    assert (out.cpu() - reference).norm() / reference.norm() < tolerance


def test_small_backbone_has_only_the_read_stages_under_resnet_names():
    config = EFTConfig(backbone="small", backbone_widths=(8, 16, 24), backbone_blocks=(1, 2, 1), hidden_dim=16,
                       n_layers=1)
    model = EpipolarFeatureTransformer(config)
    keys = list(model.state_dict())
    assert not [k for k in keys if k.startswith(UNUSED_BACKBONE)]
    assert "encoder_model.layer2.1.conv2.weight" in keys and "encoder_model.layer2.0.downsample.0.weight" in keys
    assert "encoder_model.layer1.0.downsample.0.weight" not in keys  # same width, stride 1: identity shortcut
    assert model.latent_dim == 8 + 8 + 16 + 24
    context = model.encode(torch.rand(2, 3, 32, 32))
    assert context.latents.shape == (2, model.latent_dim, 16, 16)


def test_small_backbone_round_trips_through_save_and_load(tmp_path):
    config = EFTConfig(backbone="small", backbone_widths=(8, 16, 24), hidden_dim=16, n_layers=1)
    model = EpipolarFeatureTransformer(config)
    loaded = load_eft(save_eft(model, tmp_path / "eft.pt"))
    assert loaded.config.backbone == "small" and tuple(loaded.config.backbone_widths) == (8, 16, 24)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_backbone_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="eft.backbone must be one of 'resnet18', 'small', got 'resnet50'"):
        EpipolarFeatureTransformer(EFTConfig(backbone="resnet50"))

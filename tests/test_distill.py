"""The distillation loop and its diffusion guidance, with small recording fakes for the frozen models."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.external.imagen_unet import UnetConfig
from sparsefusion.external.nerf_network import NeRFConfig
from sparsefusion.external.nerf_renderer import NeRFRenderConfig
from sparsefusion.data.synthetic import render_synthetic_scene
from sparsefusion.distill import DistillConfig, Distillation, History, nerf_rays, run_distillation
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer
from sparsefusion.eft_render import FeatureRenderConfig
from sparsefusion.guidance import DiffusionGuidance
from sparsefusion.losses import mean_huber, opacity_term
from sparsefusion.models import Models
from sparsefusion.nerf_steps import NeRFSteps
from sparsefusion.vae import LatentCodec
from sparsefusion.vldm import VLDM, VLDMConfig

SIZE = 32          # image side; the EFT's feature grid and the latents are SIZE / 8 = 4
INPUTS = [0, 3]    # the context views of the test scene


@pytest.fixture(scope="module")
def scene():
    """Six 32×32 views of a synthetic hydrant, masked as upstream's data."""
    return render_synthetic_scene("hydrant", 3, n_views=6, image_hw=(SIZE, SIZE)).to_scene()


def small_config(**overrides):
    """A DistillConfig at test sizes: 16² training rays, 3 circle cameras, a coarse 4-level grid."""
    sizes = dict(iterations=6, fusion_start=2, perceptual_start=4, train_rays=16, image_size=SIZE, circle_cameras=3,
                 turntable_frames=2, lr=1e-2, eval_perturb=False,
                 nerf=NeRFConfig(num_levels=4, base_resolution=8, desired_resolution=64, log2_hashmap_size=12,
                                 hidden_dim=32, grid_backend="torch"),
                 nerf_render=NeRFRenderConfig(num_steps=8, upsample_steps=8),
                 features=FeatureRenderConfig(image_size=SIZE))
    return DistillConfig(**{**sizes, **overrides})


def tiny_eft():
    return EpipolarFeatureTransformer(EFTConfig(hidden_dim=16, n_layers=1, backbone_weights="random"))


def tiny_vldm():
    return VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=16), image_size=SIZE // 8))


class RecordingCodec(torch.nn.Module):
    """Stands in for the LatentCodec: 8× average pooling to 4 channels; decoding upsamples with a weight that
    could learn, possibly out of [0, 1]."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.5))
        self.decoded = []

    def encode_images(self, images):
        pooled = F.avg_pool2d(images * 2 - 1, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode_latents(self, latents):
        self.decoded.append(latents)
        return F.interpolate(latents[:, :3] * self.gain + 0.5, scale_factor=8)


class RecordingVLDM(torch.nn.Module):
    """A real VLDM whose denoise calls are recorded: noise level and conditioning."""

    def __init__(self, vldm):
        super().__init__()
        self.vldm, self.calls = vldm, []

    def denoise(self, latents, cond, max_thres, model=None, generator=None):
        self.calls.append({"max_thres": max_thres, "cond": cond})
        return self.vldm.denoise(latents, cond, max_thres, model=model, generator=generator)


def zero_unet(x, log_snr, cond=None):
    """A UNet predicting ε = 0: PLMS then only rescales and adds posterior noise."""
    return torch.zeros_like(x)


class SquaredLPIPS(torch.nn.Module):
    """Stands in for LPIPS: mean squared difference per image, (B, 1, 1, 1), with a weight that could learn."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, y):
        return self.scale * ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def fake_models(eft=None, lpips=None):
    """Models with the tiny EFT, a recording codec, a recording VLDM driven by the zero UNet."""
    return Models(eft=eft or tiny_eft(), codec=RecordingCodec(), vldm=RecordingVLDM(tiny_vldm()), unet=zero_unet,
                  lpips=lpips)


class RecordingGuidance:
    """Stands in for DiffusionGuidance: records its calls; the loss is the renders' mean."""

    def __init__(self):
        self.calls = []

    def loss(self, images, features, perceptual=True):
        self.calls.append({"features": features, "perceptual": perceptual, "shape": tuple(images.shape)})
        return {"l1": images.mean(), "total": images.mean()}


def distillation(scene, models, config, **options):
    return Distillation(models, scene.cameras, scene.images, scene.masks, INPUTS, config, **options)


# ---------------------------------------------------------------------------------------------
# The loop


def test_a_new_distillation_is_ready_to_step(scene):
    d = distillation(scene, fake_models(), small_config())
    n_cameras = len(scene) + 3
    assert d.cache.features.shape == (n_cameras, 16, 4, 4) and d.cache.eft_images.shape == (n_cameras, 3, SIZE, SIZE)
    assert d.bootstrap_masks.shape == (n_cameras, 1, SIZE, SIZE)
    assert set(d.step(0)) >= {"volumetric", "fusion"}


def test_the_fusion_step_switches_from_the_eft_bootstrap_to_the_guidance_after_fusion_start(scene):
    guidance = RecordingGuidance()
    config = small_config(iterations=6, fusion_start=2, perceptual_start=4)
    history, _ = run_distillation(distillation(scene, fake_models(), config, guidance=guidance))
    assert len(guidance.calls) == 3  # iterations 3, 4, 5
    assert [call["perceptual"] for call in guidance.calls] == [False, True, True]
    assert all(call["shape"] == (1, 3, SIZE, SIZE) for call in guidance.calls)  # renders upsampled to image_size

    rows = history.rows
    assert len(rows) == config.iterations  # every iteration, every term
    for row in rows:
        assert {"volumetric", "color", "silhouette", "opacity", "fusion", "fusion_opacity"} <= set(row)
        context = config.color_weight * row["color"] + config.silhouette_weight * row["silhouette"]
        assert row["volumetric"] == pytest.approx(context + config.opacity_weight * row["opacity"], rel=1e-5)
    for row in rows[:3]:
        assert "diffusion_l1" not in row
        assert row["fusion"] == pytest.approx(row["bootstrap_color"] + row["bootstrap_silhouette"], rel=1e-5)
    for row in rows[3:]:
        assert "bootstrap_color" not in row and row["fusion"] == row["diffusion_l1"]


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_views_and_noise_levels_follow_upstreams_draws(scene, scale):
    """Per iteration, from one generator: the first of a permutation of the input views (context step), the
    second of a permutation of the cached cameras (fusion step), then after fusion_start one uniform draw
    clamped to 0.99 (the noise level) — upstream's torch.randperm / torch.rand calls in its order; a
    noise_level_scale below 1 narrows the noise levels' range and draws the same numbers."""
    models, seed = fake_models(), 11
    config = small_config(iterations=5, fusion_start=1, noise_level_scale=scale)
    d = distillation(scene, models, config, seed=seed)
    rendered = []
    render_train = d.render_train
    d.render_train = lambda view: rendered.append(view) or render_train(view)
    run_distillation(d)

    generator = torch.Generator().manual_seed(seed)
    torch.rand(config.circle_cameras, generator=generator)  # the circle cameras' jitter, drawn first
    n_cached = len(scene) + config.circle_cameras
    expected_views, expected_levels = [], []
    for iteration in range(config.iterations):
        expected_views.append(INPUTS[int(torch.randperm(len(INPUTS), generator=generator)[0])])
        expected_views.append(int(torch.randperm(n_cached, generator=generator)[1]))
        if iteration > config.fusion_start:
            expected_levels.append(min(float(torch.rand(1, generator=generator)) * scale, 0.99))
    assert rendered == expected_views
    calls = models.vldm.calls
    assert [call["max_thres"] for call in calls] == expected_levels
    fusion_views = expected_views[1::2][config.fusion_start + 1:]
    for call, view in zip(calls, fusion_views):
        assert torch.equal(call["cond"], d.cache.features[view:view + 1])


class SingleCameraFusion(Distillation):
    """The reference for views_per_step = 1: upstream's fusion step written out for one camera, from the NeRF's
    own ray grid and render call."""

    def fusion_terms(self, iteration):
        cfg, side = self.config, self.config.train_rays
        slot = int(torch.randperm(len(self.cache.query_index), generator=self.generator)[1])
        rays_o, rays_d = nerf_rays(self.cameras.augmented[slot], side, cfg.image_size)
        out = self.nerf.render(rays_o, rays_d, config=cfg.nerf_render, perturb=True, bg_color=0.0,
                               generator=self.device_generator)
        scale = cfg.image_size / side
        image = F.interpolate(out["image"].reshape(1, side, side, 3).permute(0, 3, 1, 2), scale_factor=scale,
                              mode="bilinear")
        silhouette = F.interpolate(out["weights_sum"].reshape(1, 1, side, side), scale_factor=scale, mode="bilinear")
        if iteration > cfg.fusion_start:
            guided = self.guidance.loss(image, self.cache.features[slot:slot + 1],
                                        perceptual=iteration >= cfg.perceptual_start)
            terms = {"fusion": guided.pop("total"), **{f"diffusion_{name}": term for name, term in guided.items()}}
        else:
            terms = {"bootstrap_color": mean_huber(image, self.cache.eft_images[slot:slot + 1]),
                     "bootstrap_silhouette": mean_huber(silhouette, self.bootstrap_masks[slot:slot + 1])}
            terms["fusion"] = terms["bootstrap_color"] + terms["bootstrap_silhouette"]
        terms["opacity"] = opacity_term(silhouette)
        terms["total"] = terms["fusion"] + cfg.opacity_weight * terms["opacity"]
        return terms


def test_one_view_per_step_is_upstreams_single_camera_step_bit_for_bit(scene):
    models = fake_models(lpips=SquaredLPIPS())
    config = small_config(iterations=5, fusion_start=1, perceptual_start=3)  # views_per_step left at its default
    reference = SingleCameraFusion(models, scene.cameras, scene.images, scene.masks, INPUTS, config, seed=3)
    expected, _ = run_distillation(reference)
    history, _ = run_distillation(distillation(scene, models, replace(config, views_per_step=1), seed=3))
    assert "diffusion_perceptual" in history.rows[-1]
    assert history.rows == expected.rows


def test_a_fusion_step_with_k_views_denoises_k_distinct_cameras_in_one_call_and_averages_their_losses(scene):
    """Per fusion step, bootstrap ones too: one render of K distinct cached cameras, the K entries of a fresh
    permutation from its second on; after fusion_start one call of the guidance's targets with the K renders
    and their cameras' features at one noise level; every loss term the mean of the K views' terms."""
    views, seed = 3, 4
    models = fake_models(lpips=SquaredLPIPS())
    config = small_config(iterations=5, fusion_start=1, perceptual_start=1, views_per_step=views)
    d = distillation(scene, models, config, seed=seed)
    renders, calls = [], []
    render_train, targets = d.render_train, d.guidance.targets
    d.render_train = lambda *chosen: renders.append((chosen, *render_train(*chosen))) or renders[-1][1:]
    d.guidance.targets = lambda *args: calls.append((*args, targets(*args))) or calls[-1][-1]
    history, _ = run_distillation(d)

    generator = torch.Generator().manual_seed(seed)
    torch.rand(config.circle_cameras, generator=generator)  # the circle cameras' jitter
    n_cached = len(scene) + config.circle_cameras
    expected_views = []
    for iteration in range(config.iterations):
        torch.randperm(len(INPUTS), generator=generator)  # the context view
        expected_views.append(torch.randperm(n_cached, generator=generator).roll(-1)[:views].tolist())
        if iteration > config.fusion_start:
            torch.rand(1, generator=generator)  # the noise level
    fusion = renders[1::2]
    assert [list(chosen) for chosen, _, _ in fusion] == expected_views
    assert all(len(set(chosen)) == views for chosen, _, _ in fusion)

    def upsampled(images):
        return F.interpolate(images, scale_factor=SIZE / config.train_rays, mode="bilinear")

    for (chosen, images, silhouettes), row in zip(fusion[:config.fusion_start + 1], history.rows):
        slots = list(chosen)
        color = [mean_huber(image, target) for image, target in zip(upsampled(images), d.cache.eft_images[slots])]
        assert row["bootstrap_color"] == pytest.approx(torch.stack(color).mean().item(), rel=1e-5)
        assert row["fusion_opacity"] == pytest.approx(opacity_term(upsampled(silhouettes)).item(), rel=1e-5)

    assert len(calls) == config.iterations - config.fusion_start - 1  # one targets call per guided step
    guided = zip(fusion[config.fusion_start + 1:], calls, history.rows[config.fusion_start + 1:])
    for (chosen, images, _), (renders_in, features, _, target), row in guided:
        assert renders_in.shape == (views, 3, SIZE, SIZE) and torch.equal(renders_in, upsampled(images))
        assert torch.equal(features, d.cache.features[list(chosen)])
        errors = (renders_in - target.images).flatten(1)
        l1 = target.weights * errors.abs().mean(dim=1)  # (K,) each view's (1 − ᾱ)·L1
        perceptual = 4 * (errors ** 2).mean(dim=1)      # (K,) SquaredLPIPS of each view (LPIPS sees 2x − 1)
        assert row["diffusion_l1"] == pytest.approx(l1.mean().item(), rel=1e-5)
        assert row["diffusion_perceptual"] == pytest.approx(perceptual.mean().item(), rel=1e-5)


@pytest.mark.parametrize("views", [0, 10])  # the test scene has 9 cached cameras: 6 views, 3 on the circle
def test_more_views_per_step_than_cached_cameras_or_none_is_refused(scene, views):
    with pytest.raises(ValueError, match=r"views_per_step must be in 1\.\.9 \(the cached cameras\), got"):
        distillation(scene, fake_models(), small_config(views_per_step=views))


def test_no_gradient_reaches_the_frozen_models(scene):
    codec = LatentCodec(AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                                          norm_groups=4)))
    frozen = {"eft": tiny_eft(), "codec": codec.requires_grad_(True), "vldm": tiny_vldm(), "lpips": SquaredLPIPS()}
    models = Models(unet=None, **frozen)  # the real UNet, eager
    d = distillation(scene, models, small_config(iterations=3, fusion_start=0, perceptual_start=0))
    history, _ = run_distillation(d)
    assert "diffusion_perceptual" in history.rows[-1]
    for name, model in frozen.items():
        assert all(p.grad is None and not p.requires_grad for p in model.parameters()), name
    assert all(p.grad is not None for p in d.nerf.parameters())


def test_a_nerf_fitted_by_the_loop_reproduces_its_context_views(scene):
    config = small_config(method="inputs_only", iterations=150)
    d = distillation(scene, fake_models(), config)
    targets = F.interpolate(scene.images, scale_factor=config.train_rays / SIZE)  # as the context step sees them

    def psnr(views):
        images, _ = d.render(d.cameras.scene[views], size=config.train_rays)
        return [-10 * math.log10(F.mse_loss(image, target).item()) for image, target in zip(images, targets[views])]

    assert max(psnr(INPUTS)) < 12
    history, _ = run_distillation(d)
    assert min(psnr(INPUTS)) > 30, psnr(INPUTS)
    assert max(psnr([1, 2, 4, 5])) < 25  # the novel views it never saw stay far off
    assert "fusion" not in history.rows[-1]


def test_the_nerf_precision_runs_the_mlp_in_bf16_and_stays_close_to_fp32(scene):
    """nerf_precision bf16: the training render's MLP runs in bf16 (the renders differ from fp32's), the grid
    and compositing in fp32 (they differ by bf16's rounding of the MLP, not more), and the gradients reach the
    fp32 parameters."""
    renders = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        d = distillation(scene, fake_models(), small_config(nerf_precision=precision), seed=3)
        images, silhouettes = d.render_train(0, 4)
        d.descend(images.sum() + silhouettes.sum())
        renders[precision] = images.detach()
        assert images.dtype == torch.float32
        assert all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in d.nerf.parameters())
    error = ((renders["bf16"] - renders["fp32"]).norm() / renders["fp32"].norm()).item()
    assert 1e-5 < error < 2e-2, error


def test_an_unknown_nerf_precision_is_refused(scene):
    with pytest.raises(ValueError, match="nerf_precision"):
        distillation(scene, fake_models(), small_config(nerf_precision="fp16"))


def test_nerf_steps_need_cuda_for_graphs():
    parameter = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="CUDA graphs need the NeRF on a CUDA device"):
        NeRFSteps(lambda index: (parameter * index,), [parameter], torch.optim.Adam([parameter]), graphed=True)


def test_history_reads_the_device_once_per_flush_and_keeps_absent_terms_apart():
    history = History()
    history.append({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    history.append({"a": torch.tensor(3.0)})
    assert history.rows == []
    history.flush()
    assert history.rows == [{"a": 1.0, "b": 2.0}, {"a": 3.0}]
    curves = history.curves(["a", "b", "never"])
    assert curves["a"] == [1.0, 3.0] and curves["b"][0] == 2.0 and math.isnan(curves["b"][1]) and "never" not in curves
    assert history.latest("b") == 2.0 and history.latest("never") is None


# ---------------------------------------------------------------------------------------------
# The guidance


def guidance_setup(seed=5):
    models = SimpleNamespace(codec=RecordingCodec(), vldm=RecordingVLDM(tiny_vldm()), unet=zero_unet,
                             lpips=SquaredLPIPS())
    generator = torch.Generator().manual_seed(seed)
    guidance = DiffusionGuidance(models, perceptual_weight=0.1, generator=generator,
                                 device_generator=torch.Generator().manual_seed(0))
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), requires_grad=True)
    features = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    return guidance, models, images, features


@pytest.mark.parametrize("seed", [5, 6])
def test_the_diffusion_loss_is_one_minus_alpha_bar_times_l1_plus_the_perceptual_term(seed):
    guidance, models, images, features = guidance_setup(seed)
    terms = guidance.loss(images, features, perceptual=True)

    t = min(torch.rand(1, generator=torch.Generator().manual_seed(seed)).item(), 0.99)
    assert models.vldm.calls[0]["max_thres"] == t and models.vldm.calls[0]["cond"] is features
    alpha_bar = math.cos(math.pi / 2 * (t + 0.008) / 1.008) ** 2  # the cosine schedule
    target = F.interpolate(models.codec.decoded[0][:, :3] * 1.5 + 0.5, scale_factor=8).clamp(0, 1)
    l1 = (1 - alpha_bar) * (images - target).abs().mean().item()
    perceptual = 4 * ((images - target) ** 2).mean().item()  # LPIPS sees 2x − 1
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert terms["perceptual"].item() == pytest.approx(perceptual, rel=1e-5)
    assert terms["total"].item() == pytest.approx(l1 + 0.1 * perceptual, rel=1e-5)


def test_the_perceptual_term_is_off_until_asked_for():
    guidance, _, images, features = guidance_setup()
    terms = guidance.loss(images, features, perceptual=False)
    assert set(terms) == {"l1", "total"} and terms["total"] is terms["l1"]


def test_the_targets_carry_no_gradient_even_from_models_that_would_learn():
    guidance, models, images, features = guidance_setup()
    targets = guidance.targets(images, features, 0.5)
    assert not targets.images.requires_grad and not targets.weights.requires_grad
    assert targets.images.shape == images.shape and targets.weights.shape == (1,) and targets.noise_level == 0.5
    guidance.loss(images, features)["total"].backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

"""Each fast path against the fp32 path on the same inputs, on the GPU (issue 14).

The fast paths, and where their other tests live:

- UNet (sparsefusion/fast_unet.py, models.UNET_PATHS): 'graph' = a bf16 copy of the weights under
  autocast, channels_last, one CUDA graph per input shape; 'compile' = the same through torch.compile;
  compile mode 'reduce-overhead' (its own graphs). tests/test_vldm.py checks bf16 + channels_last on the
  CPU and the fp32 graph replay and the default fast path of the small UNet on CUDA.
- PLMS (sampling.py, VLDM.denoise and denoise_grouped): the distillation's truncated PLMS with a fast UNet.
- NeRF: the Triton grid encoder (external/gridencoder/triton_kernel.py, 'auto' on CUDA), and autocast
  around a render (only the MLP then runs in half precision). tests/test_gridencoder.py compares the
  encoder alone with the reference; tests/test_nerf.py renders a small NeRF under autocast.
- VAE: LatentCodec's bf16 autocast and channels_last. tests/test_vae.py compares bf16 (NCHW) at full size.
- LPIPS: no fast path; on CUDA it runs in fp32 with PyTorch's default TF32 convolutions.
- NeRF steps (sparsefusion/nerf_steps.py): the distillation's training renders and Adam steps replayed
  from CUDA graphs, one scene and several at once, against the eager distillation.

References run in strict fp32 (TF32 off), the fast paths as they run in the distillation. Errors are
relative L2 errors (benchmarks/measures.py's, as docs/vldm.md, docs/vae.md and docs/nerf.md report them).
Every test needs CUDA; without it the whole module is skipped.
"""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision

from benchmarks.measures import relative_error
from sparsefusion.external.autoencoder_kl import AutoencoderKL
from sparsefusion.external.nerf_network import NeRFConfig, NeRFNetwork
from sparsefusion.fast_unet import FastPathConfig, fast_unet
from sparsefusion.data.synthetic import render_synthetic_scene
from sparsefusion.distill import Distillation, run_distillation
from sparsefusion.models import UNET_PATHS, Models, unet_callable
from sparsefusion.multi_scene import MultiSceneDistillation, run_multi_scene
from sparsefusion.perceptual import lpips_distance, lpips_from_backbone
from sparsefusion.precision import autocast
from sparsefusion.vae import LatentCodec, LatentCodecConfig
from sparsefusion.vldm import VLDM
from tests.test_distill import INPUTS, SIZE, RecordingCodec, SquaredLPIPS, small_config, tiny_eft
from tests.test_multi_scene import SEEDS, RecordingVLDM, conditioned_eps
from tests.test_nerf import look_at_rays
from tests.test_perceptual import _synthetic_image
from tests.test_vldm import inputs, randomise_final_conv, small_vldm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = torch.device("cuda")


@contextmanager
def strict_fp32():
    """Run a block with TF32 off for convolutions and matrix products (PyTorch lets cuDNN use TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# UNet and PLMS


@pytest.fixture(scope="module")
def full_vldm():
    """The released-size VLDM (400 M parameters) on the GPU, random weights and a non-zero final conv."""
    torch.manual_seed(0)
    with DEVICE:
        vldm = VLDM()
    return randomise_final_conv(vldm).eval()


@pytest.fixture
def small_cuda_vldm():
    """tests/test_vldm.py's small VLDM on the GPU: torch.compile of the full UNet takes a minute."""
    return randomise_final_conv(small_vldm()).to(DEVICE).eval()


def unet_inputs(vldm, batch, seed):
    """Return (latents (B, 4, h, w), λ (B,), EFT-like features (B, Cc, h, w)) on the GPU at vldm's sizes."""
    torch.manual_seed(seed)
    size, channels = vldm.config.image_size, vldm.config.unet.cond_images_channels
    return [value.to(DEVICE) for value in inputs(batch, size, channels)]


# bf16 keeps 8 significant bits (0.4 % per rounding); after the UNet's ~100 layers ε̂ moves by ~1 % at full
# size (docs/vldm.md measures 1.0–1.25e-2) and up to ~2 % in the small UNet's narrow layers (measured on the
# CPU; test_vldm.py's CPU bound is 5e-2). A broken path (stale graph input, wrong layout) is O(1) off.
@pytest.mark.parametrize("config,vldm_fixture,tolerance", [
    (UNET_PATHS["graph"], "full_vldm", 3e-2),
    (UNET_PATHS["compile"], "small_cuda_vldm", 5e-2),
    (FastPathConfig(compile_mode="reduce-overhead", cuda_graph=False), "small_cuda_vldm", 5e-2),
], ids=["graph", "compile", "reduce-overhead"])
def test_fast_unet_eps_stays_close_to_fp32(config, vldm_fixture, tolerance, request):
    vldm = request.getfixturevalue(vldm_fixture)
    fast = fast_unet(vldm.unet, config)
    for seed in range(2):  # the first call captures or compiles, the second replays on new inputs
        x, log_snr, cond = unet_inputs(vldm, batch=2, seed=seed)
        with strict_fp32(), torch.no_grad():
            reference = vldm.unet(x, log_snr, cond)
        assert relative_error(fast(x, log_snr, cond), reference) < tolerance


def truncated_plms(vldm, latents, features, noise_levels, model):
    """Return x̂_0 (B, 4, h, w) of VLDM.denoise (one noise level) or denoise_grouped (a list: one per row).

    The PLMS noise comes from GPU generators seeded alike on every call.
    """
    if isinstance(noise_levels, list):
        generators = [torch.Generator(DEVICE).manual_seed(g) for g in range(len(noise_levels))]
        return vldm.denoise_grouped(latents, features, noise_levels, model=model, generators=generators)[0]
    generator = torch.Generator(DEVICE).manual_seed(0)
    return vldm.denoise(latents, features, noise_levels, model=model, generator=generator)[0]


# Five scenes of 10, 20, 30, 40 and 50 steps: the batch shrinks 5, 4, 3, 2, 1 and the padded UNet runs at
# 5, 4, 4 (one row padded), 2, 1. Nothing above 0.5: from high noise x̂_0 is mostly the UNet's own sample,
# which bf16 moves by more (levels 0.1–0.9 gave 1.07e-2 on an H200; 0.99, upstream's restart from t = 1,
# 2.6–5.8e-2 with the small UNet on the CPU), and the bound would have to grow past what a bug shows.
GROUPED_NOISE_LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("grouped", [False, True], ids=["one-scene", "grouped"])
def test_truncated_plms_with_the_graph_unet_stays_close_to_fp32(full_vldm, grouped):
    noise_levels = GROUPED_NOISE_LEVELS if grouped else 0.5
    latents, _, features = unet_inputs(full_vldm, batch=len(noise_levels) if grouped else 2, seed=0)
    fast = unet_callable(full_vldm, "graph", DEVICE, max_batch=latents.shape[0] if grouped else None)
    with strict_fp32():
        reference = truncated_plms(full_vldm, latents, features, noise_levels, None)
    x0 = truncated_plms(full_vldm, latents, features, noise_levels, fast)
    # x̂_0 is mostly the noised latent the PLMS starts from: a 1 % error of ε̂ moves it by ~0.1 %
    # (docs/vldm.md: 1.4e-3 after 50 steps). A wrong ε̂ history or padded row is O(1) off.
    assert relative_error(x0, reference) < 1e-2


# ---------------------------------------------------------------------------------------------
# NeRF


def textured_nerf(grid_backend):
    """Return upstream's NeRF (NeRFConfig()) on the GPU with a random, semi-transparent, textured field.

    Table and MLP draws large enough that the grid shapes the density, and a negative density bias so that
    rays collect 0.1–0.3 opacity: neither empty nor opaque, so every parameter's gradient counts. Finer
    levels get smaller features, as in a trained field: with equal ones the density would vary within a
    thousandth of the scene, and the importance samples' tiny moves with the coarse weights would decide it.
    """
    torch.manual_seed(0)
    nerf = NeRFNetwork(NeRFConfig(grid_backend=grid_backend)).to(DEVICE).train()
    offsets = nerf.encoder.levels.offsets
    with torch.no_grad():
        for level in range(len(offsets) - 1):
            nerf.encoder.embeddings[offsets[level]:offsets[level + 1]].normal_(std=0.5 * 0.8**level)
        for parameter in nerf.sigma_net.parameters():
            parameter.normal_(std=0.3)
        nerf.sigma_net.net[-1].bias[0] = -3.0
    return nerf


def render_and_gradients(nerf, rays_o, rays_d, precision):
    """Return (render {'image', 'depth', 'weights_sum', 'mask'}, {name: gradient of every parameter}).

    A training render (random depth jitter, seeded) of rays (R, 3) under autocast at precision; the
    gradients are of the render's image and weights_sum against fixed random cotangents.
    """
    with autocast(DEVICE, precision):
        out = nerf.render(rays_o, rays_d, perturb=True, bg_color=0.0, generator=torch.Generator(DEVICE).manual_seed(0))
    cotangents = torch.Generator(DEVICE).manual_seed(1)
    loss = sum((out[key] * torch.randn(out[key].shape, generator=cotangents, device=DEVICE)).sum()
               for key in ("image", "weights_sum"))
    names, parameters = zip(*nerf.named_parameters())
    return out, dict(zip(names, torch.autograd.grad(loss, parameters)))


NERF_RAYS_SIDE = 64  # 64² rays × (64 stratified + 64 importance) samples, upstream's NeRFRenderConfig()


@pytest.mark.parametrize("precision,render_tolerance,gradient_tolerance", [
    # Triton vs reference encoder: 1e-5 relative (tests/test_gridencoder.py); compositing and the
    # importance samples that follow the coarse weights pass it on, the table's gradient the most: its
    # rows are those the slightly moved samples touch (measured on an H200: 1.4e-3).
    ("fp32", 1e-4, 5e-3),
    # fp16 autocast (tests/test_nerf.py's, benchmarks/bench_nerf.py's; the distillation renders in fp32):
    # the MLP keeps 11 significant bits, the render moves by ~5e-4 (measured on the CPU). The importance
    # samples follow the fp16 coarse weights to slightly other points, and the few table rows each one
    # touches get other gradients: the table's moves by ~1e-1 (1.3e-2 without importance samples).
    ("fp16", 5e-3, 2e-1),
])
def test_nerf_render_and_gradients_with_the_triton_encoder_match_the_fp32_reference(
        precision, render_tolerance, gradient_tolerance):
    rays_o, rays_d = (rays.reshape(-1, 3).to(DEVICE) for rays in look_at_rays([0.0, -6.0, 1.0], NERF_RAYS_SIDE, 1.2))
    with strict_fp32():
        reference, reference_gradients = render_and_gradients(textured_nerf("torch"), rays_o, rays_d, "fp32")
    out, gradients = render_and_gradients(textured_nerf("triton"), rays_o, rays_d, precision)
    for key in ("image", "depth", "weights_sum"):
        assert relative_error(out[key], reference[key]) < render_tolerance, key
    for name, gradient in reference_gradients.items():
        assert gradient.abs().max() > 0, name
        assert relative_error(gradients[name], gradient) < gradient_tolerance, name


def cuda_models():
    """test_multi_scene's small models (a real small VLDM, stand-ins for the rest) on the GPU."""
    torch.manual_seed(0)
    return Models(eft=tiny_eft().to(DEVICE), codec=RecordingCodec().to(DEVICE), vldm=RecordingVLDM().to(DEVICE),
                  unet=conditioned_eps, lpips=SquaredLPIPS().to(DEVICE))


def distill_on_cuda(scenes, config, together):
    """Return (histories, NeRF state dicts, the NeRFSteps) of scenes distilled on the GPU, at once or one by one."""
    models = cuda_models()
    runs = [Distillation(models, scene.cameras, scene.images, scene.masks, INPUTS, config, seed=seed)
            for scene, seed in zip(scenes, SEEDS)]
    if together:
        multi = MultiSceneDistillation(runs)
        histories, _ = run_multi_scene(multi)
        steps = [multi.steps]
    else:
        histories = [run_distillation(run)[0] for run in runs]
        steps = [run.steps for run in runs]
    return histories, [run.nerf.state_dict() for run in runs], steps


@pytest.mark.parametrize("together", [False, True], ids=["one-scene", "scenes-at-once"])
def test_graphed_nerf_steps_follow_the_eager_distillation(together):
    """nerf_graphs on against off: every loss term of every iteration (bootstrap and guided) and the final NeRFs.

    Context steps render one camera, fusion steps two: two kinds of render, each warmed up twice, then
    captured and replayed; StepLR changes the learning rate after 6 context steps, so the graphs are
    captured again. Tolerance: the graphed step runs fused capturable Adam where the eager one runs the
    foreach Adam, and the Triton encoder's atomic adds sum in varying order; both move values by ~1e-7, and
    a few grid entries by whole Adam steps. A replay drawing other jitter, or reading stale rays or
    gradients, moves the loss terms by 1e-2 or more.
    """
    scenes = [render_synthetic_scene("hydrant", seed, n_views=6, image_hw=(SIZE, SIZE)).to_scene().to(DEVICE)
              for seed in (3, 4)]
    config = small_config(iterations=10, fusion_start=3, perceptual_start=6, views_per_step=2, lr_step=6,
                          nerf=replace(small_config().nerf, grid_backend="triton"))
    eager, eager_nerfs, eager_steps = distill_on_cuda(scenes, replace(config, nerf_graphs=False), together)
    graphed, graphed_nerfs, graphed_steps = distill_on_cuda(scenes, config, together)
    assert not any(steps.graphed for steps in eager_steps)
    assert all(sorted(steps.captured) == [2 if together else 1, 4 if together else 2] for steps in graphed_steps)
    for history_eager, history_graphed in zip(eager, graphed):
        assert any("diffusion_l1" in row for row in history_eager.rows)
        for row_eager, row_graphed in zip(history_eager.rows, history_graphed.rows, strict=True):
            assert row_graphed == pytest.approx(row_eager, rel=1e-4, abs=1e-6)
    for nerf_eager, nerf_graphed in zip(eager_nerfs, graphed_nerfs):
        for name in nerf_eager:
            close = torch.isclose(nerf_graphed[name], nerf_eager[name], rtol=1e-3, atol=1e-4)
            # Grid rows whose gradient is at the rounding level take whole Adam steps either way (docs/demo.md,
            # "Several scenes at once"): measured 22 of 26,048 table entries on an H200, the loss terms unmoved.
            assert close.float().mean() > 0.995, name


# ---------------------------------------------------------------------------------------------
# VAE and LPIPS


@pytest.mark.parametrize("precision,tolerance", [
    ("fp32", 1e-2),  # TF32 convolutions: 10 significant bits, ~1e-3 (docs/vae.md)
    ("bf16", 5e-2),  # docs/vae.md measures 1.3e-2 for latents and images; test_vae.py's bound
])
def test_channels_last_codec_at_full_size_stays_close_to_fp32(precision, tolerance):
    with DEVICE:
        vae = AutoencoderKL()  # SD v1's architecture, random weights
    images = torch.rand(2, 3, 256, 256, device=DEVICE)
    with strict_fp32(), torch.no_grad():
        codec = LatentCodec(vae)
        latents = codec.encode_images(images)
        decoded = codec.decode_latents(latents)
    fast = LatentCodec(vae, LatentCodecConfig(precision=precision, channels_last=True))  # converts vae in place
    with torch.no_grad():
        assert relative_error(fast.encode_images(images), latents) < tolerance
        assert relative_error(fast.decode_latents(latents), decoded) < tolerance


def random_vgg_lpips():
    """Return LPIPS(vgg) on the CPU with a randomly initialised VGG16 backbone and lpips' calibrated linear layers."""
    features = torchvision.models.vgg16().features.state_dict()
    return lpips_from_backbone({f"features.{key}": value for key, value in features.items()}, "vgg")


def lpips_and_slope(model, images, targets):
    """Return (LPIPS distances (B,), d/dα LPIPS(images + α·(images − targets)) at α = 0 (B,)), on the CPU.

    The slope is the gradient's component along images − targets: how fast the distance falls as a render
    (images) moves to its target, what the distillation's gradient step does. Pixel by pixel the gradient is
    rough: max pooling and ReLUs route it by near-ties, and an input moved by 1e-6 moves it by ~10 %.
    """
    images = images.clone().requires_grad_()
    distances = lpips_distance(model, images, targets)
    gradient = torch.autograd.grad(distances.sum(), images)[0]
    return distances.detach().cpu(), (gradient * (images - targets)).flatten(1).sum(1).detach().cpu()


def test_lpips_on_cuda_matches_the_cpu():
    model = random_vgg_lpips()
    targets = _synthetic_image(256).expand(3, -1, -1, -1)
    images = torch.cat([(targets[:1] + 0.05 * torch.randn_like(targets[:1])).clamp(0, 1),
                        F.avg_pool2d(targets[:1], 5, 1, 2), targets[:1].roll(7, dims=-1)])
    distances, slopes = lpips_and_slope(model, images, targets)
    cuda_distances, cuda_slopes = lpips_and_slope(model.to(DEVICE), images.to(DEVICE), targets.to(DEVICE))
    # The distillation's LPIPS runs with PyTorch's defaults: TF32 convolutions, 10 significant bits.
    # Emulated on the CPU (inputs and weights of every convolution rounded), they move distances and
    # slopes by < 1e-3, with random or trained VGG weights.
    assert (distances > 0).all() and (slopes > 0).all()
    assert ((cuda_distances - distances).abs() / distances).max() < 5e-3
    assert ((cuda_slopes - slopes).abs() / slopes).max() < 1e-2

"""Per-scene distillation: fit a grid NeRF to the context views and to VLDM denoisings of its own renders.

SparseFusion §3.3 (view-conditioned diffusion distillation), as upstream's sparsefusion/distillation.py:

1. cameras: the scene's cameras in the frame of camera 0 (R = I, T kept: the NeRF's world), plus
   50 cameras on a circle fitted to the scene's, jittered by up to 0.17 rad;
2. cache: for every one of those cameras, the EFT features (conditioning of the VLDM) and the
   EFT image (colour head, upsampled ×8), the context views being the input views;
3. each iteration:
   a. context step — render a random input view at 128² rays; Huber colour + Huber silhouette
      + opacity regulariser; Adam step; scheduler step;
   b. fusion step — render a random cached camera, upsample ×2 to 256²;
      up to iteration fusion_start: Huber to the EFT image and to its thresholded mean (the
      bootstrap); after: encode the render, noise it to a random level t ≤ 0.99, denoise by PLMS,
      decode, L1 weighted by 1 − ᾱ(t) plus LPIPS(vgg)·0.1; opacity regulariser; Adam step.

The hot loop keeps fixed shapes and makes no host synchronisation except every log_every iterations.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from external.nerf_network import NeRFConfig, NeRFNetwork
from external.nerf_renderer import RenderConfig as NeRFRenderConfig
from sparsefusion.camera_path import circle_path
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.eft import huber
from sparsefusion.eft_render import RenderConfig as FeatureRenderConfig
from sparsefusion.eft_render import depth_range, feature_cache
from sparsefusion.perceptual import lpips_distance
from sparsefusion.rays import grid_rays, grid_xy
from sparsefusion.relative_cameras import relative_cameras


METHODS = ("sparsefusion", "inputs_only")


@dataclass
class DistillConfig:
    method: str = "sparsefusion"       # 'sparsefusion'; 'inputs_only': context steps only, a NeRF fit to the input
                                       # views alone (the method's ablation: no EFT, no diffusion)
    iterations: int = 3000             # optimisation steps per scene
    lr: float = 5e-4                   # Adam learning rate of the MLP (the grid gets 10×)
    lr_step: int = 3000                # StepLR step size, counted in context steps
    lr_gamma: float = 0.2              # StepLR decay
    fusion_start: int = 1000           # diffusion distillation from the iteration after this one
    perceptual_start: int = 1000       # LPIPS term from this iteration on
    perceptual_weight: float = 0.1     # weight of the LPIPS(vgg) term
    color_weight: float = 1.0          # Huber colour loss weight
    silhouette_weight: float = 1.0     # Huber silhouette loss weight
    opacity_weight: float = 1e-3       # weight of mean sqrt(silhouette² + 0.01)
    bootstrap_threshold: float = 0.1   # EFT image mean above this counts as foreground in the bootstrap
    train_rays: int = 128              # NeRF renders are train_rays² rays during optimisation ...
    image_size: int = 256              # ... upsampled (bilinear) to image_size², the VLDM's image size
    eval_perturb: bool = True          # upstream renders its final frames with stratified jitter on
    circle_cameras: int = 50           # extra cameras on the fitted circle for the fusion step
    circle_jitter: float = 0.17        # their random angular jitter, radians
    turntable_frames: int = 50         # frames of the {seq}_circle.gif turntable
    log_every: int = 20                # loss history, plots and previews every this many iterations
    precision: str = "fp32"            # "fp32", or "bf16" autocast for the VAE/VLDM/LPIPS calls on CUDA
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    nerf_render: NeRFRenderConfig = field(default_factory=NeRFRenderConfig)
    features: FeatureRenderConfig = field(default_factory=FeatureRenderConfig)


@dataclass
class SceneCameras:
    """The cameras of one distillation, in the NeRF's world (the frame of scene camera 0)."""

    scene: PerspectiveCameras      # (N) the scene's cameras
    augmented: PerspectiveCameras  # (N + circle_cameras) the scene's plus the jittered circle
    turntable: PerspectiveCameras  # (turntable_frames) the circle, without jitter


def scene_cameras(cameras, config, generator=None):
    """Return the SceneCameras of a scene's absolute cameras (N), as upstream lays them out."""
    circle = circle_path(cameras, n=config.circle_cameras, theta_offset_max=config.circle_jitter, generator=generator)
    augmented = PerspectiveCameras.cat([cameras, circle.to(cameras.device)])
    nerf_frame = relative_cameras(cameras, 0, center_at_origin=False)
    return SceneCameras(
        scene=nerf_frame,
        augmented=relative_cameras(augmented, 0, center_at_origin=False),
        turntable=circle_path(nerf_frame, n=config.turntable_frames).to(cameras.device),
    )


def nerf_rays(cameras, n_rays_side, image_size):
    """Return (rays_o, rays_d), each (B, n², 3): a grid of n² rays per camera.

    The grid spans the image with the half-pixel offset of an image_size² image, as upstream's
    samplers (so a 128² grid for a 256² image is not centred on 128² pixel centres).
    """
    edge = 1.0 - 1.0 / image_size
    xy = grid_xy(n_rays_side, n_rays_side, edge, -edge, edge, -edge, device=cameras.device, dtype=cameras.dtype)
    bundle = grid_rays(cameras, n_rays_side, n_rays_side, 1.0, 2.0, 1, xy=xy)
    return bundle.origins.flatten(1, 2), bundle.directions.flatten(1, 2)


def opacity_term(silhouettes):
    """Return mean sqrt(s² + 0.01) of silhouettes: upstream's opacity regulariser."""
    return torch.sqrt(silhouettes ** 2 + 0.01).mean()


class Distillation:
    """One scene's NeRF, its optimiser and the cached EFT outputs; `step` runs one iteration."""

    def __init__(self, models, cameras, images, masks, input_index, config=None, generator=None,
                 device_generator=None):
        """Args:
            models: sparsefusion.models.Models.
            cameras: the scene's absolute cameras (N).
            images: (N, 3, S, S) in [0, 1], S = config.image_size; masks: (N, 1, S, S) in [0, 1].
            input_index: the context views, a list of ints.
            generator: CPU generator for view choices and noise levels; device_generator for noise
                on the device (PLMS, ray jitter).
        """
        self.config = config or DistillConfig()
        if self.config.method not in METHODS:
            raise ValueError(f"DistillConfig.method must be one of {METHODS}, got {self.config.method!r}")
        self.models, self.images, self.masks = models, images, masks
        self.input_index = torch.as_tensor(input_index, dtype=torch.long)
        self.generator, self.device_generator = generator, device_generator
        self.device = images.device
        self.cameras = scene_cameras(cameras, self.config, generator)
        self.near, self.far = depth_range(cameras, self.config.features.depth_margin)
        self.nerf = NeRFNetwork(self.config.nerf).to(self.device).train()
        self.optimizer = torch.optim.Adam(self.nerf.get_params(self.config.lr), lr=self.config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, self.config.lr_step, self.config.lr_gamma)
        self.train_rays = [nerf_rays(self.cameras.augmented[i], self.config.train_rays, self.config.image_size)
                           for i in range(len(self.cameras.augmented))]
        self.cache = None

    def build_cache(self):
        """Cache EFT features and images of every augmented camera (the context: the input views)."""
        augmented = self.cameras.augmented
        context_images = self.images[self.input_index]
        self.cache = feature_cache(self.models.eft, augmented, self.input_index, context_images,
                                   self.near, self.far, config=self.config.features)
        bootstrap_mask = (self.cache.eft_images.mean(dim=1, keepdim=True) > self.config.bootstrap_threshold)
        self.bootstrap_masks = bootstrap_mask.float()
        return self.cache

    def render_train(self, view):
        """Return (images (1, 3, s, s), silhouettes (1, 1, s, s)) of augmented camera view at s = train_rays."""
        rays_o, rays_d = self.train_rays[view]
        out = self.nerf.render(rays_o, rays_d, config=self.config.nerf_render, perturb=True, bg_color=0.0,
                               generator=self.device_generator)
        side = self.config.train_rays
        return (out["image"].reshape(1, side, side, 3).permute(0, 3, 1, 2),
                out["weights_sum"].reshape(1, 1, side, side))

    def context_loss(self):
        """Return the context-view loss terms {'color', 'silhouette', 'opacity', 'total'} of a random input view."""
        cfg = self.config
        view = int(self.input_index[torch.randperm(len(self.input_index), generator=self.generator)[0]])
        images, silhouettes = self.render_train(view)
        factor = cfg.train_rays / cfg.image_size
        target_rgb = F.interpolate(self.images[view:view + 1], scale_factor=factor)
        target_mask = F.interpolate(self.masks[view:view + 1], scale_factor=factor)
        terms = {
            "color": huber(images, target_rgb).abs().mean(),
            "silhouette": huber(silhouettes, target_mask).abs().mean(),
            "opacity": opacity_term(silhouettes),
        }
        terms["total"] = (cfg.color_weight * terms["color"] + cfg.silhouette_weight * terms["silhouette"]
                          + cfg.opacity_weight * terms["opacity"])
        return terms

    def fusion_loss(self, iteration):
        """Return the fusion loss terms {'fusion', 'opacity', 'total'} on a random cached camera."""
        cfg = self.config
        # upstream takes the second entry of a permutation of the cached cameras
        slot = int(torch.randperm(len(self.cache.query_index), generator=self.generator)[1])
        images, silhouettes = self.render_train(slot)
        scale = cfg.image_size / cfg.train_rays
        images = F.interpolate(images, scale_factor=scale, mode="bilinear")
        silhouettes = F.interpolate(silhouettes, scale_factor=scale, mode="bilinear")
        if iteration > cfg.fusion_start:
            fusion = self.diffusion_loss(images, slot, iteration)
        else:
            fusion = (cfg.color_weight * huber(images, self.cache.eft_images[slot:slot + 1]).abs().mean()
                      + cfg.silhouette_weight * huber(silhouettes, self.bootstrap_masks[slot:slot + 1]).abs().mean())
        terms = {"fusion": fusion, "opacity": opacity_term(silhouettes)}
        terms["total"] = fusion + cfg.opacity_weight * terms["opacity"]
        return terms

    def diffusion_loss(self, images, slot, iteration):
        """Return (1 − ᾱ)·L1(render, VLDM denoising of the render) + the perceptual term."""
        cfg, models = self.config, self.models
        max_thres = min(max(float(torch.rand(1, generator=self.generator)), 0.0), 0.99)
        with torch.no_grad(), self._autocast():
            latents = models.codec.encode_images(images)
            x0, _, _, alpha_bar = models.vldm.denoise(latents, self.cache.features[slot:slot + 1], max_thres,
                                                      model=models.unet, generator=self.device_generator)
            target = models.codec.decode_latents(x0).float().clamp(0.0, 1.0)
        loss = (1 - alpha_bar.float()).reshape(()) * (images - target).abs().mean()
        if models.lpips is not None and iteration >= cfg.perceptual_start:
            loss = loss + cfg.perceptual_weight * lpips_distance(models.lpips, images, target).mean()
        return loss

    def _autocast(self):
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def step(self, iteration):
        """Run one iteration (context step, then fusion step); return its loss terms as tensors.

        Method 'inputs_only' runs the context step alone (no 'fusion' term).
        """
        context = self.context_loss()
        self.optimizer.zero_grad(set_to_none=True)
        context["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        losses = {"volumetric": context["total"].detach(), "opacity": context["opacity"].detach()}
        if self.config.method == "inputs_only":
            return losses

        fusion = self.fusion_loss(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        fusion["total"].backward()
        self.optimizer.step()
        return {**losses, "fusion": fusion["fusion"].detach()}

    @torch.no_grad()
    def render(self, cameras, size=None):
        """Return (images (B, 3, s, s), silhouettes (B, 1, s, s)) of cameras at pixel centres, s = image_size."""
        size = size or self.config.image_size
        self.nerf.eval()
        images, silhouettes = [], []
        for i in range(len(cameras)):
            bundle = grid_rays(cameras[i], size, size, 1.0, 2.0, 1)
            out = self.nerf.render(bundle.origins.reshape(-1, 3), bundle.directions.reshape(-1, 3),
                                   config=self.config.nerf_render, staged=True, perturb=self.config.eval_perturb,
                                   bg_color=0.0, generator=self.device_generator)
            images.append(out["image"].reshape(1, size, size, 3).permute(0, 3, 1, 2))
            silhouettes.append(out["weights_sum"].reshape(1, 1, size, size))
        self.nerf.train()
        return torch.cat(images), torch.cat(silhouettes)


@dataclass
class History:
    """Loss values every log_every iterations."""

    iterations: list = field(default_factory=list)
    volumetric: list = field(default_factory=list)
    opacity: list = field(default_factory=list)
    fusion: list = field(default_factory=list)

    def append(self, iteration, losses):
        self.iterations.append(iteration)
        for name in ("volumetric", "opacity", "fusion"):
            if name in losses:
                getattr(self, name).append(float(losses[name]))


def run_distillation(distillation, progress=None, on_log=None):
    """Run all iterations of a Distillation; return (History, {'bootstrap_s', 'diffusion_s'}).

    progress: a tqdm-like bar (update, set_postfix) or None; on_log(iteration, distillation) is
    called every log_every iterations (previews, plots).
    """
    cfg = distillation.config
    history = History()
    clock = PhaseClock(distillation.device)
    for iteration in range(cfg.iterations):
        if iteration == cfg.fusion_start + 1:
            clock.lap("bootstrap_s")
        losses = distillation.step(iteration)
        if iteration % cfg.log_every == 0 or iteration == cfg.iterations - 1:
            history.append(iteration, losses)
            if progress is not None:
                progress.set_postfix({"vol": f"{history.volumetric[-1]:.4f}",
                                      **({"fusion": f"{history.fusion[-1]:.4f}"} if history.fusion else {})})
            if on_log is not None:
                on_log(iteration, distillation)
        if progress is not None:
            progress.update(1)
    clock.lap("diffusion_s" if cfg.iterations > cfg.fusion_start + 1 else "bootstrap_s")
    return history, clock.laps


class PhaseClock:
    """Wall time of consecutive phases, synchronising the device only at their ends."""

    def __init__(self, device):
        self.device, self.laps = device, {}
        self.start = time.perf_counter()

    def lap(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = now - self.start
        self.start = now


"""Per-scene distillation: fit a grid NeRF to the context views and to VLDM denoisings of its own renders.

SparseFusion §3.3 (view-conditioned diffusion distillation), as upstream's sparsefusion/distillation.py:

1. cameras: the scene's cameras in the frame of camera 0 (R = I, T kept: the NeRF's world), plus
   50 cameras on a circle fitted to the scene's, jittered by up to 0.17 rad;
2. cache: for every one of those cameras, the EFT features (conditioning of the VLDM) and the
   EFT image (colour head, upsampled ×8), the context views being the input views;
3. each iteration:
   a. context step — render a random input view at 128² rays; Huber colour + Huber silhouette
      + opacity regulariser; Adam step; scheduler step;
   b. fusion step — render views_per_step random cached cameras (upstream: 1), upsample ×2 to 256²;
      up to iteration fusion_start: Huber to the EFT images and to their thresholded means (the
      bootstrap); after: the diffusion guidance (sparsefusion/guidance.py: (1 − ᾱ)·L1 to VLDM
      denoisings of the renders, plus LPIPS(vgg)·0.1 from perceptual_start); opacity regulariser; every
      term a mean over the views; Adam step.

Randomness: every draw of a scene follows from one seed (reconstruct.py: --seed + scene index): view
choices and noise levels from a CPU generator, ray jitter and PLMS noise from a device generator,
and the draws that take no generator (the NeRF's initialisation, the EFT's dropout while caching)
from the global generators seeded with it and restored afterwards.

The hot loop keeps fixed shapes and makes no host synchronisation except every log_every iterations; on
CUDA its NeRF renders and Adam steps replay CUDA graphs (sparsefusion/nerf_steps.py, nerf_graphs).
"""

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparsefusion.camera_path import circle_path
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.config import check_choice
from sparsefusion.eft_render import FeatureRenderConfig, depth_range, feature_cache
from sparsefusion.external.nerf_network import NeRFConfig, NeRFNetwork
from sparsefusion.external.nerf_renderer import NeRFRenderConfig
from sparsefusion.guidance import DiffusionGuidance
from sparsefusion.losses import mean_huber, opacity_term
from sparsefusion.nerf_steps import NeRFSteps, nerf_optimizer
from sparsefusion.precision import autocast
from sparsefusion.rays import grid_rays, grid_xy
from sparsefusion.relative_cameras import relative_cameras


METHODS = ("sparsefusion", "inputs_only")
NERF_PRECISIONS = ("fp32", "bf16")


@dataclass
class DistillConfig:
    method: str = "sparsefusion"       # 'sparsefusion'; 'inputs_only': context steps only, a NeRF fit to the input
                                       # views alone (the method's ablation: no EFT, no diffusion)
    iterations: int = 3000             # optimisation steps per scene
    lr: float = 5e-4                   # Adam learning rate of the MLP (the grid gets 10×)
    lr_step: int = 3000                # StepLR step size, counted in context steps
    lr_gamma: float = 0.2              # StepLR decay
    fusion_start: int = 1000           # diffusion distillation from the iteration after this one
    views_per_step: int = 1            # cached cameras per fusion step (upstream: 1): one NeRF render call, one
                                       # guidance call at one noise level, losses the means over them; iterations
                                       # and fusion_start are not scaled by it (docs/demo.md)
    perceptual_start: int = 1000       # LPIPS term from this iteration on
    perceptual_weight: float = 0.1     # weight of the LPIPS(vgg) term
    noise_level_scale: float = 1.0     # guidance noise levels t = min(u · scale, 0.99), u ~ U[0, 1) (upstream: 1);
                                       # below 1 for a VLDM whose high-noise denoisings are worse than the EFT
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
    log_every: int = 20                # progress, previews and reading the losses from the device every this
                                       # many iterations (the history keeps every iteration)
    precision: str = "fp32"            # "fp32", or "bf16": autocast of the VLDM's UNet in the guidance (the VAE
                                       # and LPIPS stay fp32; sparsefusion.precision)
    nerf_precision: str = "fp32"       # "fp32", or "bf16": autocast of the NeRF's MLP in the training renders (the
                                       # grid encoder and the compositing stay fp32; docs/demo.md, "Speed")
    nerf_graphs: bool = True           # on CUDA, replay the NeRF's training renders and Adam steps from CUDA graphs
                                       # (sparsefusion/nerf_steps.py: the eager step's result, without its launches)
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


@contextmanager
def global_rng_seeded(seed, device):
    """Run a block with the global CPU generator, and device's, seeded by seed; restore both afterwards.

    For the draws that take no generator: module initialisation and dropout.
    """
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class Distillation:
    """One scene's NeRF, its optimiser, the cached EFT outputs and the guidance; `step` runs one iteration."""

    def __init__(self, models, cameras, images, masks, input_index, config=None, seed=0, guidance=None):
        """Build the NeRF and cache the EFT outputs of every augmented camera, ready for `step`.

        Args:
            models: sparsefusion.models.Models.
            cameras: the scene's absolute cameras (N).
            images: (N, 3, S, S) in [0, 1], S = config.image_size; masks: (N, 1, S, S) in [0, 1].
            input_index: the context views, a list of ints.
            seed: every random draw of the distillation follows from it (the module docstring says how).
            guidance: what the fusion steps after fusion_start minimise, called as
                guidance.loss(renders, features, perceptual) -> {'total', ...}; default the VLDM's
                DiffusionGuidance drawing from this distillation's generators.
        """
        self.config = cfg = config or DistillConfig()
        check_choice("DistillConfig.method", cfg.method, METHODS)
        check_choice("DistillConfig.nerf_precision", cfg.nerf_precision, NERF_PRECISIONS)
        self.models, self.images, self.masks = models, images, masks
        self.input_index = torch.as_tensor(input_index, dtype=torch.long)
        self.device = images.device
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cameras = scene_cameras(cameras, cfg, self.generator)
        n_cached = len(self.cameras.augmented)
        if not 1 <= cfg.views_per_step <= n_cached:
            raise ValueError(f"DistillConfig.views_per_step must be in 1..{n_cached} (the cached cameras), "
                             f"got {cfg.views_per_step}")
        self.near, self.far = depth_range(cameras, cfg.features.depth_margin)
        with global_rng_seeded(seed, self.device):
            self.nerf = NeRFNetwork(cfg.nerf).to(self.device).train()
            self.cache = feature_cache(models.eft, self.cameras.augmented, self.input_index,
                                       images[self.input_index], self.near, self.far, config=cfg.features)
        self.bootstrap_masks = (self.cache.eft_images.mean(dim=1, keepdim=True) > cfg.bootstrap_threshold).float()
        graphed = uses_graphs(cfg, self.device)
        self.optimizer = nerf_optimizer(self.nerf.get_params(cfg.lr), cfg.lr, graphed)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_gamma)
        self.steps = NeRFSteps(self.render_index, self.nerf.parameters(), self.optimizer, [self.device_generator],
                               graphed)
        # Per camera, then stacked: a batched computation could differ in the last bits on CUDA.
        rays = [nerf_rays(self.cameras.augmented[i], cfg.train_rays, cfg.image_size) for i in range(n_cached)]
        self.train_rays = tuple(torch.cat(parts) for parts in zip(*rays))  # (rays_o, rays_d), each (V, n², 3)
        self.guidance = guidance or DiffusionGuidance(models, cfg.perceptual_weight, cfg.precision,
                                                      self.generator, self.device_generator, cfg.noise_level_scale)

    def render_train(self, *views):
        """Return (images (K, 3, s, s), silhouettes (K, 1, s, s)) of augmented cameras views (K ints), s = train_rays.

        The K cameras' rays go through the NeRF in one call (a graph replay with nerf_graphs on CUDA).
        """
        return self.steps.render(list(views))

    def render_index(self, index):
        """Return render_train's renders of the augmented cameras index (K,), a tensor on the device."""
        rays_o, rays_d = (rays.index_select(0, index) for rays in self.train_rays)
        return train_renders(self.nerf, rays_o, rays_d, self.config, self.device_generator)

    def context_view(self):
        """Return the input view of a context step: the first of a permutation of the input views, as upstream."""
        return int(self.input_index[torch.randperm(len(self.input_index), generator=self.generator)[0]])

    def fusion_views(self):
        """Return the views_per_step cached cameras of a fusion step, a list of distinct ints.

        Upstream takes the second entry of a permutation of the cached cameras; K cameras are the K entries
        from the second on, wrapping round to the first, so K = 1 is upstream's draw.
        """
        order = torch.randperm(len(self.cache.query_index), generator=self.generator)
        return order.roll(-1)[:self.config.views_per_step].tolist()

    def context_terms(self):
        """Return the context step's loss terms {'color', 'silhouette', 'opacity', 'total'} on a random input view."""
        view = self.context_view()
        return self.context_loss(view, *self.render_train(view))

    def context_loss(self, view, images, silhouettes):
        """Return context_terms's terms of the NeRF's render (1, 3, s, s) and silhouette (1, 1, s, s) of input view view."""
        cfg = self.config
        factor = cfg.train_rays / cfg.image_size
        target_rgb = F.interpolate(self.images[view:view + 1], scale_factor=factor)
        target_mask = F.interpolate(self.masks[view:view + 1], scale_factor=factor)
        terms = {"color": mean_huber(images, target_rgb), "silhouette": mean_huber(silhouettes, target_mask),
                 "opacity": opacity_term(silhouettes)}
        terms["total"] = (cfg.color_weight * terms["color"] + cfg.silhouette_weight * terms["silhouette"]
                          + cfg.opacity_weight * terms["opacity"])
        return terms

    def fusion_terms(self, iteration):
        """Return the fusion step's loss terms on views_per_step random cached cameras, each a mean over them.

        'fusion' is upstream's fusion loss: up to fusion_start the bootstrap ('bootstrap_color' +
        'bootstrap_silhouette', Huber to the EFT images and their masks), after it the guidance's total
        ('diffusion_l1', 'diffusion_perceptual' from perceptual_start; one guidance call for all the
        renders); 'opacity' the regulariser; 'total' = fusion + opacity_weight·opacity.
        """
        cfg = self.config
        slots = self.fusion_views()
        images, silhouettes = upsampled(*self.render_train(*slots), cfg.image_size)
        guided = None
        if self.guided(iteration):
            guided = self.guidance.loss(images, self.cache.features[slots], perceptual=iteration >= cfg.perceptual_start)
        return self.fusion_loss(slots, images, silhouettes, guided)

    def guided(self, iteration):
        """Return whether the fusion step of an iteration is guided by the diffusion model (after fusion_start)."""
        return iteration > self.config.fusion_start

    def fusion_loss(self, slots, images, silhouettes, guided=None):
        """Return fusion_terms's terms of the upsampled renders (K, 3, S, S) and silhouettes (K, 1, S, S) of cached
        cameras slots (K ints), given the guidance's terms of the step, or None for a bootstrap step."""
        cfg = self.config
        if guided is not None:
            terms = {"fusion": guided.pop("total"), **{f"diffusion_{name}": term for name, term in guided.items()}}
        else:
            terms = {"bootstrap_color": mean_huber(images, self.cache.eft_images[slots]),
                     "bootstrap_silhouette": mean_huber(silhouettes, self.bootstrap_masks[slots])}
            terms["fusion"] = (cfg.color_weight * terms["bootstrap_color"]
                               + cfg.silhouette_weight * terms["bootstrap_silhouette"])
        terms["opacity"] = opacity_term(silhouettes)
        terms["total"] = terms["fusion"] + cfg.opacity_weight * terms["opacity"]
        return terms

    def descend(self, loss):
        """Take one Adam step on loss, a scalar of the last render_train's renders."""
        self.steps.descend(loss)

    def step(self, iteration):
        """Run one iteration (context step, then fusion step); return every loss term, detached 0-d tensors.

        Context terms: 'volumetric' (their weighted total), 'color', 'silhouette', 'opacity'; fusion
        terms (method 'sparsefusion' only): those of fusion_terms, opacity as 'fusion_opacity'.
        """
        context = self.context_terms()
        self.descend(context["total"])
        self.scheduler.step()
        terms = {"volumetric": context.pop("total"), **context}
        if self.config.method == "sparsefusion":
            fusion = self.fusion_terms(iteration)
            self.descend(fusion.pop("total"))
            terms.update(fusion_opacity=fusion.pop("opacity"), **fusion)
        return {name: term.detach() for name, term in terms.items()}

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


def uses_graphs(config, device):
    """Return whether a distillation of config on device replays its NeRF steps from CUDA graphs."""
    return config.nerf_graphs and device.type == "cuda"


def train_renders(nerf, rays_o, rays_d, config, generator):
    """Return (images (K, 3, s, s), silhouettes (K, 1, s, s)): a training render of rays (K, s², 3), s = train_rays.

    Jittered samples drawn from generator (one, or one per scene of a StackedNeRF), black background, the
    MLP under config.nerf_precision.
    """
    with autocast(rays_o.device, config.nerf_precision):
        out = nerf.render(rays_o, rays_d, config=config.nerf_render, perturb=True, bg_color=0.0, generator=generator)
    side = config.train_rays
    return (out["image"].reshape(-1, side, side, 3).permute(0, 3, 1, 2),
            out["weights_sum"].reshape(-1, 1, side, side))


def upsampled(images, silhouettes, size):
    """Return (images (B, 3, size, size), silhouettes (B, 1, size, size)): training renders upsampled bilinearly."""
    scale = size / images.shape[-1]
    return (F.interpolate(images, scale_factor=scale, mode="bilinear"),
            F.interpolate(silhouettes, scale_factor=scale, mode="bilinear"))


class History:
    """Every loss term of every iteration as floats, read from the device in one transfer per flush."""

    def __init__(self):
        self.rows = []      # {term: value} of iterations 0, 1, ...
        self._pending = []  # rows still on the device, as 0-d tensors

    def append(self, terms):
        """Keep one iteration's terms {name: 0-d tensor} (no device sync)."""
        self._pending.append(terms)

    def flush(self):
        """Read the pending iterations' terms from the device (one sync)."""
        if not self._pending:
            return
        values = iter(torch.stack([term.float() for row in self._pending for term in row.values()]).tolist())
        self.rows += [{name: next(values) for name in row} for row in self._pending]
        self._pending = []

    def curves(self, names):
        """Return {name: values per iteration, NaN where an iteration had none} of the names that occurred."""
        return {name: [row.get(name, math.nan) for row in self.rows] for name in names
                if any(name in row for row in self.rows)}

    def latest(self, name):
        """Return the last value of a term, or None if it never occurred."""
        return next((row[name] for row in reversed(self.rows) if name in row), None)


def run_distillation(distillation, progress=None, on_log=None):
    """Run all iterations of a Distillation; return (History, {'bootstrap_s', 'diffusion_s'}).

    progress: a tqdm-like bar (update, set_postfix) or None; on_log(iteration, distillation) is
    called every log_every iterations (previews, plots).
    """
    history = History()
    laps = run_iterations(distillation.config, distillation.device, lambda iteration: [distillation.step(iteration)],
                          [history], progress, on_log and (lambda iteration: on_log(iteration, distillation)))
    return history, laps


def run_iterations(config, device, step, histories, progress=None, on_log=None):
    """Run config.iterations of step(iteration) -> one row of terms per history; return {'bootstrap_s', 'diffusion_s'}.

    Every log_every iterations (and at the last) the histories are read from the device, progress (a
    tqdm-like bar or None) shows the latest losses (means over the histories) and on_log(iteration) runs.
    """
    clock = PhaseClock(device)
    for iteration in range(config.iterations):
        if iteration == config.fusion_start + 1:
            clock.lap("bootstrap_s")
        for history, row in zip(histories, step(iteration)):
            history.append(row)
        if iteration % config.log_every == 0 or iteration == config.iterations - 1:
            for history in histories:
                history.flush()
            if progress is not None:
                shown = {"vol": "volumetric", "fusion": "fusion"}
                latest = {short: [h.latest(name) for h in histories] for short, name in shown.items()}
                progress.set_postfix({short: f"{sum(values) / len(values):.4f}" for short, values in latest.items()
                                      if None not in values})
            if on_log is not None:
                on_log(iteration)
        if progress is not None:
            progress.update(1)
    clock.lap("diffusion_s" if config.iterations > config.fusion_start + 1 else "bootstrap_s")
    return clock.laps


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


"""Several scenes distilled at once, in lockstep, on one device: batched models, per-scene everything else.

A MultiSceneDistillation runs S Distillations (sparsefusion/distill.py) iteration by iteration. Each
scene keeps its own NeRF parameters, optimiser state, cached EFT outputs, cameras, loss weights and
random generators; what is shared is the work:

- NeRF: the S networks are one StackedNeRF (external/nerf_network.py): one grid-encoder launch over
  every scene's table (a per-point scene index into the stacked tables) and batched MLP matmuls. The
  rays of all scenes' renders go through one render call, each scene's block of rays drawing its jitter
  from that scene's device generator. One Adam (upstream's two groups, the grids at 10·lr) and one
  StepLR over the stacked parameters are S independent ones: both act elementwise, and every scene
  steps at every iteration. The losses of the scenes are summed for one backward; a scene's parameters
  get its own loss's gradient only.
- Guidance: guidance.scene_losses, one batch of S·K renders (K = views_per_step): one VAE encode, the
  S truncated PLMS runs sharing UNet calls, one decode, one LPIPS call. Each scene draws its own noise
  level, upstream's distribution unchanged, so the scenes' PLMS step counts differ: their schedules
  are aligned at the start (sampling.sample_plms_grouped), so each UNet call takes the scenes still
  running, all at the same local step, and the first step's second call falls at step 0 for all.

Per scene, every random draw comes from that scene's generators in the order of a run of the scene
alone (context view, fusion views, noise level from its CPU generator; ray jitter and PLMS noise from
its device generator), so S scenes at once reproduce S separate Distillations up to the floating-point
differences of batched kernels (tests/test_multi_scene.py checks this).

    scenes = [Distillation(models, cameras, images, masks, inputs, config, seed=seed) for ...]
    histories, laps = run_multi_scene(MultiSceneDistillation(scenes))   # scenes[s].nerf: scene s's NeRF
"""

from itertools import accumulate

import torch

from sparsefusion.distill import History, run_iterations, train_renders, upsampled, uses_graphs
from sparsefusion.external.nerf_network import StackedNeRF
from sparsefusion.guidance import DiffusionGuidance, scene_losses
from sparsefusion.nerf_steps import NeRFSteps, nerf_optimizer

# DistillConfig fields that must agree between the scenes of one lockstep run (the rest may differ, e.g. the
# silhouette weight of a scene without masks)
LOCKSTEP_FIELDS = ("method", "iterations", "lr", "lr_step", "lr_gamma", "fusion_start", "views_per_step",
                   "perceptual_start", "train_rays", "image_size", "log_every", "precision", "nerf_precision", "nerf",
                   "nerf_render")


class MultiSceneDistillation:
    """S Distillations stepped together: one StackedNeRF, one optimiser, batched guidance; `step` runs one iteration."""

    def __init__(self, scenes):
        """Take over the NeRFs of scenes, S Distillations of one device whose LOCKSTEP_FIELDS agree.

        From here on the stacked parameters are the scenes' NeRFs; sync_scene_nerfs copies them back into
        each scene's NeRFNetwork (scenes[s].nerf), for its renders, previews, checkpoint and mesh.
        """
        self.scenes = list(scenes)
        self.config = cfg = self.scenes[0].config
        self.device = self.scenes[0].device
        for scene in self.scenes[1:]:
            differing = [name for name in LOCKSTEP_FIELDS if getattr(scene.config, name) != getattr(cfg, name)]
            if differing:
                raise ValueError(f"scenes distilled at once need the same DistillConfig.{differing[0]}")
            if scene.device != self.device:
                raise ValueError("scenes distilled at once must be on one device")
        if cfg.method == "sparsefusion" and not all(isinstance(s.guidance, DiffusionGuidance) for s in self.scenes):
            raise ValueError("scenes distilled at once need DiffusionGuidance (scene_losses batches it)")
        self.nerf = StackedNeRF([scene.nerf for scene in self.scenes])
        graphed = uses_graphs(cfg, self.device)
        self.optimizer = nerf_optimizer(self.nerf.get_params(cfg.lr), cfg.lr, graphed)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_gamma)
        self.device_generators = [scene.device_generator for scene in self.scenes]
        # every scene's cached cameras' rays in one table, scene s's from row first_rows[s]
        self.train_rays = tuple(torch.cat([scene.train_rays[i] for scene in self.scenes]) for i in range(2))
        self.first_rows = list(accumulate((len(scene.train_rays[0]) for scene in self.scenes), initial=0))
        for scene, first, end in zip(self.scenes, self.first_rows, self.first_rows[1:]):
            scene.train_rays = tuple(rays[first:end] for rays in self.train_rays)  # views: the rays are held once
        self.steps = NeRFSteps(self.render_index, self.nerf.parameters(), self.optimizer, self.device_generators,
                               graphed)

    def render_train(self, views):
        """Return per scene (images (K, 3, s, s), silhouettes (K, 1, s, s)) of its augmented cameras views[s] (K ints).

        All S·K cameras' rays go through the stacked NeRF in one call (a graph replay with nerf_graphs on
        CUDA), s = train_rays.
        """
        rows = [first + view for first, chosen in zip(self.first_rows, views) for view in chosen]
        images, silhouettes = self.steps.render(rows)  # (S·K, 3, s, s), (S·K, 1, s, s)
        scenes = len(self.scenes)
        return list(zip(images.chunk(scenes), silhouettes.chunk(scenes)))

    def render_index(self, index):
        """Return the renders (S·K, ...) of rows index (S·K,) of the stacked ray table, scene s's the s-th block."""
        rays_o, rays_d = (rays.index_select(0, index) for rays in self.train_rays)  # each (S·K, n², 3)
        return train_renders(self.nerf, rays_o, rays_d, self.config, self.device_generators)

    def descend(self, losses):
        """Take one Adam step on the sum of the scenes' losses (S scalars)."""
        self.steps.descend(torch.stack(losses).sum())

    def step(self, iteration):
        """Run one iteration of every scene; return per scene its Distillation.step terms (detached 0-d tensors)."""
        cfg, scenes = self.config, self.scenes
        views = [scene.context_view() for scene in scenes]
        context = [scene.context_loss(view, *renders)
                   for scene, view, renders in zip(scenes, views, self.render_train([[view] for view in views]))]
        self.descend([terms["total"] for terms in context])
        self.scheduler.step()
        rows = [{"volumetric": terms.pop("total"), **terms} for terms in context]
        if cfg.method == "sparsefusion":
            slots = [scene.fusion_views() for scene in scenes]
            renders = [upsampled(*pair, cfg.image_size) for pair in self.render_train(slots)]
            guided = [None] * len(scenes)
            if scenes[0].guided(iteration):
                features = torch.cat([scene.cache.features[chosen] for scene, chosen in zip(scenes, slots)])
                guided = scene_losses([scene.guidance for scene in scenes], torch.cat([r[0] for r in renders]),
                                      features, perceptual=iteration >= cfg.perceptual_start)
            fusion = [scene.fusion_loss(chosen, *pair, terms)
                      for scene, chosen, pair, terms in zip(scenes, slots, renders, guided)]
            self.descend([terms.pop("total") for terms in fusion])
            for row, terms in zip(rows, fusion):
                row.update(fusion_opacity=terms.pop("opacity"), **terms)
        return [{name: term.detach() for name, term in row.items()} for row in rows]

    @torch.no_grad()
    def sync_scene_nerfs(self):
        """Copy each scene's stacked parameters into its own NeRFNetwork, scenes[s].nerf."""
        for index, scene in enumerate(self.scenes):
            scene.nerf.load_state_dict(self.nerf.scene_state_dict(index))


def run_multi_scene(multi, progress=None, on_log=None):
    """Run all iterations of a MultiSceneDistillation; return (a History per scene, {'bootstrap_s', 'diffusion_s'}).

    The phase times are the whole group's. progress: a tqdm-like bar over the group's iterations, or None;
    on_log(iteration, index, distillation) is called for every scene every log_every iterations, its
    NeRFNetwork synchronised first. At the end every scene's NeRFNetwork holds its distilled parameters.
    """
    histories = [History() for _ in multi.scenes]

    def log(iteration):
        multi.sync_scene_nerfs()
        if on_log is not None:
            for index, scene in enumerate(multi.scenes):
                on_log(iteration, index, scene)

    laps = run_iterations(multi.config, multi.device, multi.step, histories, progress, log)
    multi.sync_scene_nerfs()
    return histories, laps

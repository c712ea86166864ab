"""The joint training objective of the EFT and the VLDM (upstream's train.py step), the VAE frozen.

One step, as upstream (Zhou & Tulsiani, CVPR 2023, Sec. 3.3): take a scene (views_per_scene random
frames of a sequence), draw a query view and 2–5 context views, re-express the cameras relative to the
query (query at the origin); the EFT renders a grid of features and colours at the query (32×32 for
256² images); the VAE encodes the query image to scaled latents; the VLDM's ε-loss runs on
diffusion_batch_size copies of that latent at independent noise levels, masked to the valid region
(the query's valid region shrunk to the latent grid, > 0.6); the EFT's pseudo-Huber colour loss
compares its colours with the query image read at the ray positions, with the same mask.
loss = diffusion + colour; Adam for each model, then StepLR for each.

queries_per_step > 1 (ours; upstream draws 1) renders several query views of the scene in one batch,
each in its own query-centred frame, all sharing the context views.

Checkpoints: ckpt_{name}.pt (VLDM, upstream's layout plus its architecture 'config') and
ckpt_{name}_eft.pt (EFT, likewise), each with its optimizer and scheduler.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsefusion.external.autoencoder_kl import AutoencoderKL
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.checkpoint import load_file, load_state_dict_strict, load_training_state, model_checkpoint
from sparsefusion.eft import EpipolarFeatureTransformer, sample_views
from sparsefusion.eft_render import depth_range, feature_rays, render_features
from sparsefusion.losses import huber
from sparsefusion.outputs import side_by_side
from sparsefusion.precision import autocast
from sparsefusion.rays import RayBundle
from sparsefusion.relative_cameras import sample_query_and_context
from sparsefusion.training import RANDOM_VAE
from sparsefusion.vae import LatentCodec, LatentCodecConfig, load_latent_codec
from sparsefusion.vldm import VLDM


@dataclass
class TrainingBatch:
    """One step's inputs: Q query views and their shared context views, cameras relative to each query."""

    query_cameras: PerspectiveCameras     # (Q) the query cameras: R = I, T = 0 each
    context_cameras: PerspectiveCameras   # (V) for Q = 1, else (Q·V) query-major: the V cameras in each query's frame
    context_images: torch.Tensor          # (V, 3, H, W) in [0, 1]
    near: float                           # depth range of the ray points: d̄ ∓ depth_margin
    far: float
    rays: RayBundle                       # (Q, h, w, P) the EFT's feature rays of the query cameras
    target_colors: torch.Tensor           # (Q, h, w, 3) the query images at the rays' NDC xy
    latents: torch.Tensor                 # (Q, 4, h, w) the query images' VAE latents, scaled
    loss_mask: torch.Tensor               # (Q, 1, h, w) 1 inside the valid region, else 0
    query_image: torch.Tensor             # (Q, 3, H, W) in [0, 1]


def colors_at_rays(images, xys):
    """Return images (B, 3, H, W) read bilinearly at NDC xys (B, ..., 2), as (B, ..., 3).

    Upstream's sample_images_at_mc_locs: grid_sample at −xy with align_corners=True (NDC ±1 at the
    outer pixel centres). Our rays lie inside ±1, where border and zero padding agree.
    """
    flat = sample_views(images, xys.reshape(xys.shape[0], -1, 2))  # (B, M, 3)
    return flat.reshape(*xys.shape[:-1], images.shape[1])


def valid_loss_mask(valid_region, scale, threshold=0.6):
    """Return the (B, 1, H/scale, W/scale) 0/1 loss mask: valid_region (B, 1, H, W) bilinearly shrunk, > threshold."""
    small = F.interpolate(valid_region, scale_factor=1.0 / scale, mode="bilinear")
    return (small > threshold).to(valid_region.dtype)


def draw_query_and_context_size(n_views, num_input_range, queries=1):
    """Return (query indices (queries,), context size): upstream's randperm(N)[:1], then randint(low, high)."""
    query = torch.randperm(n_views)[:queries]
    context_size = int(torch.randint(num_input_range[0], num_input_range[1], (1,)))
    return query, context_size


def training_batch(scene, codec, config, device):
    """Return the TrainingBatch of a scene (on any device) for one step, drawn with the global RNG, on device.

    Draws in upstream's order: the queries (randperm), the number of context views (randint), the
    context views (randperm; they may include a query). d̄ comes from the scene's absolute cameras.
    """
    queries, context_size = draw_query_and_context_size(len(scene), config.num_input_range, config.queries_per_step)
    cameras = scene.cameras.cpu()
    views = [sample_query_and_context(cameras, scene.images, query_index=queries[:1], context_size=context_size,
                                      center_at_origin=True)]
    views += [sample_query_and_context(cameras, scene.images, query_index=q[None], context_index=views[0].context_index,
                                       center_at_origin=True) for q in queries[1:]]
    near, far = depth_range(cameras, config.depth_margin)
    query_cameras = PerspectiveCameras.cat([v.query_cameras for v in views]).to(device)
    query_image = torch.cat([v.query_images for v in views]).to(device)
    valid = scene.valid_region[queries.to(scene.valid_region.device)].to(device)
    rays = feature_rays(query_cameras, near, far, config.render_config())
    with torch.no_grad():
        latents = codec.encode_images(query_image)
    return TrainingBatch(
        query_cameras=query_cameras,
        context_cameras=PerspectiveCameras.cat([v.context_cameras for v in views]).to(device),
        context_images=views[0].context_images.to(device),
        near=near,
        far=far,
        rays=rays,
        target_colors=colors_at_rays(query_image, rays.xys),
        latents=latents,
        loss_mask=valid_loss_mask(valid, config.feature_scale, config.mask_threshold),
        query_image=query_image,
    )


class JointModel(nn.Module):
    """The EFT and the VLDM trained together; one module, so one DDP wrapper syncs both."""

    def __init__(self, eft, vldm, copies):
        super().__init__()
        self.eft = eft
        self.vldm = vldm
        self.copies = copies  # noise levels drawn per query latent (diffusion_batch_size)

    def forward(self, batch):
        """Return {'total', 'diffusion', 'color'} (scalars) and 'rgb' (Q, h, w, 3) for a TrainingBatch.

        The VLDM loss runs on `copies` copies of each query latent with its EFT features (Q, C, h, w)
        as condition and loss_mask on every latent channel; the colour loss is the mean masked
        pseudo-Huber error of the EFT colours.
        """
        context = self.eft.encode(batch.context_images)
        rendered = self.eft(batch.rays, batch.context_cameras, context)
        features = rendered.features.permute(0, 3, 1, 2)  # (Q, C, h, w)
        latents = batch.latents
        repeat = lambda x: x.repeat_interleave(self.copies, dim=0)  # (Q·copies, ...), each query's copies together
        mask = repeat(batch.loss_mask).expand(-1, latents.shape[1], -1, -1)
        diffusion = self.vldm(repeat(latents), repeat(features), loss_mask=mask).float()
        color_mask = batch.loss_mask.permute(0, 2, 3, 1)  # (Q, h, w, 1)
        color = (huber(rendered.rgb.float(), batch.target_colors) * color_mask).mean()
        return {"total": diffusion + color, "diffusion": diffusion, "color": color, "rgb": rendered.rgb}


def build_codec(config, device):
    """Return the frozen LatentCodec: the VAE at config.vae, or a random one for config.vae == 'random'.

    It runs in fp32 whatever config.precision says: for one image bf16 is slower and ~1 % off (docs/vae.md).
    """
    codec_config = LatentCodecConfig(precision="fp32")
    if config.vae == RANDOM_VAE:
        warnings.warn("training with a randomly initialised VAE (vae=random): for smoke runs only", stacklevel=2)
        return LatentCodec(AutoencoderKL(config.autoencoder), codec_config).to(device)
    return load_latent_codec(config.vae, device=device, config=codec_config, vae_config=config.autoencoder)


def adam_with_step_lr(module, config):
    """Return (Adam, StepLR) over a module's parameters with the config's rate and decay."""
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma)


class JointObjective:
    """What the Trainer needs of the joint stage: the model, its optimizers, batches, checkpoints, pictures."""

    loss_names = ("total", "diffusion", "color")
    find_unused_parameters = True  # ResNet-18's layer4/fc and the UNet's null_conditional_* get no gradient

    def __init__(self, config, device, dataset=None):
        """dataset: the training scenes (not read here: this stage needs nothing of them up front)."""
        self.config, self.device = config, device
        self.model = self.build_model(config).to(device).train()
        self.eft, self.vldm = self.model.eft, self.model.vldm
        self.codec = build_codec(config, device)
        vldm_pair, eft_pair = adam_with_step_lr(self.vldm, config), adam_with_step_lr(self.eft, config)
        self.optimizers = [vldm_pair[0], eft_pair[0]]  # upstream steps the VLDM's optimizer first
        self.schedulers = [vldm_pair[1], eft_pair[1]]

    @staticmethod
    def build_model(config):
        """Return the freshly initialised JointModel of a TrainConfig."""
        return JointModel(EpipolarFeatureTransformer(config.eft), VLDM(config.vldm), config.diffusion_batch_size)

    def batch(self, scene):
        return training_batch(scene, self.codec, self.config, self.device)

    @staticmethod
    def checkpoint_files(exp_dir, name):
        """Return {role: path} of a checkpoint name ('latest' or a zero-padded step); the first holds the run state."""
        return {"vldm": exp_dir / f"ckpt_{name}.pt", "eft": exp_dir / f"ckpt_{name}_eft.pt"}

    def checkpoints(self, step):
        """Return {role: checkpoint dict} in upstream's layout plus each model's architecture 'config'."""
        return {role: model_checkpoint(module, step, optimizer, scheduler) for role, module, optimizer, scheduler
                in zip(("vldm", "eft"), (self.vldm, self.eft), self.optimizers, self.schedulers)}

    def load(self, checkpoints, paths):
        """Load weights, optimizer and scheduler states from {role: checkpoint dict} (strict keys)."""
        for role, module, optimizer, scheduler in zip(("vldm", "eft"), (self.vldm, self.eft), self.optimizers,
                                                      self.schedulers):
            load_training_state(module, checkpoints[role], optimizer, scheduler,
                                f"{role.upper()} checkpoint {paths[role]}")

    def load_initial_weights(self):
        """Load init_eft / init_vldm weights (strictly) when given; otherwise keep the fresh initialisation."""
        if self.config.init_eft:
            ckpt = load_file(self.config.init_eft, "EFT checkpoint (init_eft)")
            load_state_dict_strict(self.eft, ckpt.get("model_state_dict", ckpt), f"init_eft {self.config.init_eft}")
        if self.config.init_vldm:
            self.vldm.load_checkpoint(self.config.init_vldm)

    @torch.no_grad()
    def visualize(self, scene):
        """Return an (h, w, 3) image: context views | target | EFT colours | a diffusion sample, labelled, for the
        first query.

        A fresh query and context are drawn from the scene, as upstream does (the caller forks the
        random state, so visualising changes no training draw).
        """
        config = self.config
        batch = self.batch(scene)
        packed = render_features(self.eft, batch.query_cameras[:1], batch.context_cameras[:len(batch.context_images)],
                                 batch.context_images, batch.near, batch.far, config.render_config())
        rgb, features = packed.permute(0, 3, 1, 2).split([3, packed.shape[-1] - 3], dim=1)
        with autocast(self.device, config.precision):
            latents = self.vldm.sample(features, sampler=config.vis_sampler)
        sample = self.codec.decode_latents(latents.float())
        eft_image = F.interpolate(rgb, scale_factor=config.feature_scale, mode="bilinear").clamp(0, 1)
        panels = [*batch.context_images, batch.query_image[0], eft_image[0], sample[0]]
        labels = [f"context {i + 1}" for i in range(len(batch.context_images))] + ["target", "EFT", "VLDM sample"]
        return side_by_side([panel.permute(1, 2, 0).float().cpu().numpy() for panel in panels], labels=labels)

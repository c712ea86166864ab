"""The grid-encoded NeRF that distillation optimises: stable-dreamfusion's NeRFNetwork, 'grid' backbone.

Upstream SparseFusion (external/nerf/network_grid.py) builds it with bound 4, a 'tiledgrid' encoder
(16 levels × 2 features, base resolution 16, 2^16 rows per level, finest resolution 2048·bound) and a
3-layer, 64-wide MLP to (raw density, 3 raw albedo channels); a Gaussian density blob at the centre is
added before the exponential. Only the 'albedo' shading the distillation uses is implemented (no
normals, no background network: upstream runs with bg_radius 0). Parameter names match upstream's,
so a checkpoint of either loads into the other.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from sparsefusion.external.gridencoder import BACKENDS, GridConfig, GridEncoder
from sparsefusion.external.nerf_renderer import NeRFRenderConfig, render
from sparsefusion.config import check_choice


@dataclass
class NeRFConfig:
    bound: float = 4.0                          # the scene box is [−bound, bound]^3
    num_layers: int = 3                         # layers of the density/albedo MLP
    hidden_dim: int = 64                        # width of its hidden layers
    num_levels: int = 16                        # grid levels
    level_dim: int = 2                          # features per level
    base_resolution: int = 16                   # coarsest grid resolution
    log2_hashmap_size: int = 16                 # rows per level capped at 2^this (upstream: 16)
    desired_resolution: Optional[float] = None  # finest grid resolution; None = 2048·bound as upstream
    gridtype: str = "tiled"                     # "tiled" (upstream) or "hash"
    grid_backend: str = "auto"                  # grid encoder backend: "auto", "torch", "triton" or "tcnn"
    blob_density: float = 5.0                   # raw density added at the centre (upstream: 5)
    blob_radius: float = 0.2                    # standard deviation of that Gaussian blob, world units

    def grid_config(self):
        """Return the GridConfig of the encoder."""
        desired = 2048 * self.bound if self.desired_resolution is None else self.desired_resolution
        return GridConfig(
            input_dim=3,
            num_levels=self.num_levels,
            level_dim=self.level_dim,
            base_resolution=self.base_resolution,
            log2_hashmap_size=self.log2_hashmap_size,
            desired_resolution=desired,
            gridtype=self.gridtype,
        )


class _TruncExp(torch.autograd.Function):
    """exp(x) in float32 whose gradient uses exp(clamp(x, −15, 15)), torch-ngp's trunc_exp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-15, 15))


def trunc_exp(x):
    """Return exp(x) computed in float32 (autocast off), with the gradient clamped as torch-ngp's trunc_exp."""
    with torch.autocast(x.device.type, enabled=False):
        return _TruncExp.apply(x.float())


def density_blob(x, density, radius):
    """Return the raw density density·exp(−|x|² / (2·radius²)) (...,) of points x (..., 3)."""
    return density * torch.exp(-(x**2).sum(-1) / (2 * radius**2))


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last); state keys net.{i}.weight/bias."""

    def __init__(self, dim_in, dim_out, dim_hidden, num_layers):
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (num_layers - 1) + [dim_out]
        self.net = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i < len(self.net) - 1:
                x = F.relu(x)
        return x


class NeRFNetwork(nn.Module):
    """Density and albedo field on [−bound, bound]^3 with a volume renderer.

    State dict (upstream's): encoder.embeddings, encoder.offsets, sigma_net.net.{0,1,2}.{weight,bias},
    aabb_train, aabb_infer.
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = NeRFConfig() if config is None else config
        check_choice("grid_backend", self.config.grid_backend, BACKENDS)
        self.bound = self.config.bound
        self.encoder = GridEncoder(self.config.grid_config(), backend=self.config.grid_backend)
        self.sigma_net = MLP(self.encoder.output_dim, 4, self.config.hidden_dim, self.config.num_layers)
        box = torch.tensor([-self.bound] * 3 + [self.bound] * 3)
        # upstream keeps separate (equal) boxes for training and inference, both in its checkpoints
        self.register_buffer("aabb_train", box.clone())
        self.register_buffer("aabb_infer", box.clone())

    def forward(self, x):
        """Return (density (P,) float32 ≥ 0, albedo (P, 3) in [0, 1]) at points x (P, 3) in [−bound, bound]."""
        h = self.sigma_net(self.encoder(x, bound=self.bound))
        blob = density_blob(x, self.config.blob_density, self.config.blob_radius)
        sigma = trunc_exp(h[..., 0] + blob)
        albedo = torch.sigmoid(h[..., 1:])
        return sigma, albedo

    def get_params(self, lr):
        """Return Adam parameter groups: the grid at 10·lr, the MLP at lr (upstream's get_params)."""
        return [
            {"params": list(self.encoder.parameters()), "lr": lr * 10},
            {"params": list(self.sigma_net.parameters()), "lr": lr},
        ]

    def render(self, rays_o, rays_d, config=None, staged=False, perturb=False, bg_color=None, generator=None):
        """Return {'image' (..., 3), 'depth' (...), 'weights_sum' (...), 'mask' (...)} for rays (..., 3).

        As upstream's NeRFRenderer.render with cuda_ray off: the training box and random importance
        samples in train mode, the inference box and deterministic ones in eval mode; staged=True
        renders config.max_ray_batch rays at a time. See nerf_renderer.render.
        """
        config = NeRFRenderConfig() if config is None else config
        return render(
            self,
            rays_o,
            rays_d,
            aabb=self.aabb_train if self.training else self.aabb_infer,
            config=config,
            perturb=perturb,
            bg_color=bg_color,
            deterministic_pdf=not self.training,
            max_ray_batch=config.max_ray_batch if staged else None,
            generator=generator,
        )

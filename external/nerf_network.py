"""The grid-encoded NeRF that distillation optimises: stable-dreamfusion's NeRFNetwork, 'grid' backbone.

Upstream SparseFusion (external/nerf/network_grid.py) builds it with bound 4, a 'tiledgrid' encoder
(16 levels × 2 features, base resolution 16, 2^16 rows per level, finest resolution 2048·bound) and a
3-layer, 64-wide MLP to (raw density, 3 raw albedo channels); a Gaussian density blob at the centre is
added before the exponential. Only the 'albedo' shading the distillation uses is implemented (no
normals, no background network: upstream runs with bg_radius 0). Parameter names match upstream's,
so a checkpoint of either loads into the other.

StackedNeRF trains S such networks side by side (sparsefusion/multi_scene.py): one grid-encoder call
over all scenes' stacked tables and batched matmuls over their stacked MLP weights; scene_state_dict(s)
is scene s as an ordinary NeRFNetwork state dict.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from sparsefusion.external.gridencoder import BACKENDS, GridConfig, GridEncoder, StackedGridEncoder
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


def density_and_albedo(raw, x, config):
    """Return (density (P,) float32 ≥ 0, albedo (P, 3) in [0, 1]) from the MLP's raw output (P, 4) at points x (P, 3)."""
    sigma = trunc_exp(raw[..., 0] + density_blob(x, config.blob_density, config.blob_radius))
    return sigma, torch.sigmoid(raw[..., 1:])


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
        return density_and_albedo(self.sigma_net(self.encoder(x, bound=self.bound)), x, self.config)

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


class StackedNeRF(nn.Module):
    """S NeRFNetworks of one configuration, trained side by side: each scene's field from its own parameters.

    One grid-encoder call covers every scene (StackedGridEncoder: `encoder.embeddings` (S·rows, C)) and each
    MLP layer is one batched matmul over stacked weights `weights.{i}` (S, out, in) and `biases.{i}` (S, out).
    As a field it maps the points of S scenes, (S·P, 3) with scene s's the s-th of S equal blocks, to
    (density (S·P,), albedo (S·P, 3)). get_params keeps upstream's two groups; Adam and StepLR being
    elementwise, one optimiser over the stacked parameters is S independent ones. scene_state_dict(s)
    is scene s as a NeRFNetwork state dict (upstream's names).
    """

    def __init__(self, networks):
        super().__init__()
        first = networks[0]
        if any(network.config != first.config for network in networks[1:]):
            raise ValueError("a StackedNeRF needs NeRFNetworks of one configuration")
        self.config, self.bound, self.scenes = first.config, first.bound, len(networks)
        self.encoder = StackedGridEncoder([network.encoder for network in networks])
        layers = range(len(first.sigma_net.net))
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([n.sigma_net.net[i].weight.detach() for n in networks]))
                                        for i in layers)
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([n.sigma_net.net[i].bias.detach() for n in networks]))
                                       for i in layers)
        self.register_buffer("aabb_train", first.aabb_train.clone())
        self.register_buffer("aabb_infer", first.aabb_infer.clone())

    def forward(self, x):
        """Return (density (S·P,) float32 ≥ 0, albedo (S·P, 3) in [0, 1]) at points x (S·P, 3), scene by block."""
        h = self.encoder(x.view(self.scenes, -1, 3), bound=self.bound)  # (S, P, L·C)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))  # (S, P, out)
            if i < len(self.weights) - 1:
                h = F.relu(h)
        return density_and_albedo(h.reshape(-1, h.shape[-1]), x, self.config)

    def get_params(self, lr):
        """Return Adam parameter groups: the grids at 10·lr, the MLPs at lr (upstream's get_params)."""
        return [
            {"params": list(self.encoder.parameters()), "lr": lr * 10},
            {"params": [*self.weights, *self.biases], "lr": lr},
        ]

    render = NeRFNetwork.render  # rays (S·R, 3), scene s's the s-th block; generator a list of S, one per scene

    def scene_state_dict(self, scene):
        """Return scene's parameters as a NeRFNetwork state dict (detached copies, upstream's names)."""
        state = {"encoder.embeddings": self.encoder.scene_table(scene), "encoder.offsets": self.encoder.offsets}
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            state[f"sigma_net.net.{i}.weight"], state[f"sigma_net.net.{i}.bias"] = weight[scene], bias[scene]
        state.update(aabb_train=self.aabb_train, aabb_infer=self.aabb_infer)
        return {name: value.detach().clone() for name, value in state.items()}

"""Multiresolution grid encoder (Instant-NGP) with torch-ngp's layout and interchangeable backends.

`grid_encode(inputs, embeddings, levels, backend)` computes one function by any backend:

- "torch": pure PyTorch (reference.py), any device and float dtype, gradients for points and table;
- "triton": fused Triton kernels (triton_kernel.py), CUDA (or TRITON_INTERPRET=1 on CPU), 3-D, float32;
- "tcnn": tiny-cuda-nn, when it imports, 'hash' grids only (tcnn_backend.py says why);
- "auto": "triton" for float32 3-D points on CUDA when Triton imports, else "torch".

Kernels are imported on first use, so importing this package never compiles anything.

Several scenes at once (sparsefusion/multi_scene.py): StackedGridEncoder holds S scenes' tables in one
parameter (S·rows, C) and encodes every scene's points in one call, each point looked up in its own
scene's table (grid_encode's scene argument; "torch" and "triton" backends).
"""

import importlib.util

import torch
from torch import nn

from sparsefusion.external.gridencoder.reference import GridConfig, GridLevels, grid_encode_reference, grid_levels
from sparsefusion.config import check_choice

__all__ = ["BACKENDS", "GridConfig", "GridEncoder", "GridLevels", "StackedGridEncoder", "grid_encode", "grid_levels",
           "resolve_backend"]

BACKENDS = ("auto", "torch", "triton", "tcnn")


def triton_available():
    """Return whether the triton package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend, inputs, levels):
    """Return the concrete backend name "auto" stands for with these inputs, or backend itself (checked)."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    fits_triton = inputs.is_cuda and inputs.dtype == torch.float32 and levels.input_dim == 3
    return "triton" if fits_triton and triton_available() else "torch"


def grid_encode(inputs, embeddings, levels, backend="auto", scene=None):
    """Return the grid encoding (..., L·C) of points (..., D) in [0, 1]; points outside encode to zero.

    Args:
        inputs: (..., D) coordinates normalised to the unit box.
        embeddings: (levels.offsets[-1], C) the feature table of all levels; with scene, (S·offsets[-1], C):
            S scenes' tables stacked.
        levels: GridLevels, the layout (grid_levels(GridConfig(...))).
        backend: "auto", "torch", "triton" or "tcnn" (one scene only).
        scene: None, or (...) integers: each point's scene, whose table starts at row scene·offsets[-1].
    """
    prefix = inputs.shape[:-1]
    points = inputs.reshape(-1, levels.input_dim)  # (P, D)
    name = resolve_backend(backend, points, levels)
    if scene is not None:
        scene = scene.reshape(-1)  # (P,)
        if name == "tcnn":
            raise ValueError("the tcnn grid backend encodes one scene's grid at a time; use grid_backend 'triton' "
                             "or 'torch' to encode several scenes at once")
    if name == "torch":
        features = grid_encode_reference(points, embeddings, levels, scene)
    elif name == "triton":
        from sparsefusion.external.gridencoder.triton_kernel import grid_encode_triton

        features = grid_encode_triton(points, embeddings, levels, scene)
    else:
        from sparsefusion.external.gridencoder.tcnn_backend import grid_encode_tcnn

        features = grid_encode_tcnn(points, embeddings, levels)
    return features.reshape(*prefix, levels.output_dim)


class GridEncoder(nn.Module):
    """Learnable multiresolution grid: maps points (..., D) in [−bound, bound] to features (..., L·C).

    State dict as torch-ngp's GridEncoder: `embeddings` (rows, C) and the int32 buffer `offsets` (L+1,).
    """

    def __init__(self, config=None, backend="auto"):
        super().__init__()
        config = GridConfig() if config is None else config
        self.config = config
        self.levels = grid_levels(config)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.register_buffer("offsets", torch.tensor(self.levels.offsets, dtype=torch.int32))
        self.embeddings = nn.Parameter(torch.empty(self.levels.offsets[-1], config.level_dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.embeddings, -1e-4, 1e-4)  # torch-ngp's initialisation

    @property
    def output_dim(self):
        return self.levels.output_dim

    def forward(self, inputs, bound=1.0):
        """Return features (..., L·C) of points (..., D) in [−bound, bound]."""
        return grid_encode((inputs + bound) / (2 * bound), self.embeddings, self.levels, self.backend)

    def extra_repr(self):
        levels = self.levels
        return (
            f"input_dim={levels.input_dim}, levels={levels.num_levels}×{levels.level_dim}, "
            f"resolution={levels.resolutions[0]}→{levels.resolutions[-1]}, table={tuple(self.embeddings.shape)}, "
            f"gridtype={levels.gridtype}, align_corners={levels.align_corners}, backend={self.backend}"
        )


class StackedGridEncoder(nn.Module):
    """S scenes' learnable grids in one table: maps points (S, P, D), scene s's in [−bound, bound], to (S, P, L·C).

    `embeddings` (S·rows, C) stacks the tables of S GridEncoders of one configuration (rows =
    levels.offsets[-1]): scene s's are rows s·rows … (s+1)·rows − 1, and its points are looked up there
    only, in one backend call for all scenes. scene_table(s) is scene s's table, a GridEncoder's `embeddings`.
    """

    def __init__(self, encoders):
        super().__init__()
        first = encoders[0]
        for encoder in encoders[1:]:
            if encoder.config != first.config or encoder.backend != first.backend:
                raise ValueError("a StackedGridEncoder needs grids of one configuration and backend")
        self.config, self.levels, self.backend, self.scenes = first.config, first.levels, first.backend, len(encoders)
        self.register_buffer("offsets", first.offsets.clone())
        self.embeddings = nn.Parameter(torch.cat([encoder.embeddings.detach() for encoder in encoders]))

    @property
    def output_dim(self):
        return self.levels.output_dim

    def forward(self, inputs, bound=1.0):
        """Return features (S, P, L·C) of points (S, P, D) in [−bound, bound], scene s's from its own grid."""
        scenes, points = inputs.shape[:2]
        scene = torch.arange(scenes, device=inputs.device, dtype=torch.int32).repeat_interleave(points)  # (S·P,)
        features = grid_encode((inputs + bound) / (2 * bound), self.embeddings, self.levels, self.backend,
                               scene.view(scenes, points))
        return features

    def scene_table(self, scene):
        """Return scene's table (rows, C), a view of the stacked parameter."""
        rows = self.levels.offsets[-1]
        return self.embeddings[scene * rows:(scene + 1) * rows]

    def extra_repr(self):
        return f"scenes={self.scenes}, table={tuple(self.embeddings.shape)}, backend={self.backend}"

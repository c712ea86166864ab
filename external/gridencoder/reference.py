"""Multiresolution grid encoding (Müller et al. 2022, Instant-NGP §3) in pure PyTorch: the reference.

The layout follows torch-ngp's gridencoder exactly (the encoder upstream SparseFusion trains), so its
checkpoints load and every backend can be checked against this file:

- level l has scale s_l = H · 2^(l·log2 b) − 1 and resolution R_l = ⌈s_l⌉ + 1, computed in float32
  as the CUDA kernel does (H base resolution, b per-level scale);
- a point x ∈ [0, 1]^D sits at p = x·s_l + ½ (align_corners=False) or x·s_l (True) in grid units;
  its 2^D corners are ⌊p⌋ + {0, 1}^D, weighted trilinearly by the fractional part;
- a corner's row in the level's table is the dense index Σ_d g_d · S^d (S = R_l + 1, or R_l with
  align_corners), accumulated only while the stride S^d still fits the table; 'hash' replaces it by
  the XOR of g_d · π_d (π = 1, 2654435761, 805459861, …; uint32 arithmetic) when the table is too small
  to hold the dense grid, 'tiled' keeps the (possibly partial) dense index; both wrap modulo the table
  size T_l = min(2^log2_hashmap_size, S^D) rounded up to a multiple of 8;
- points outside [0, 1]^D encode to zero and receive no gradient.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from sparsefusion.config import check_choice

GRID_TYPES = ("hash", "tiled")

# torch-ngp's (and tiny-cuda-nn's) per-dimension hash factors; the first is 1 for memory coherence.
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)

_UINT32 = 0xFFFFFFFF


@dataclass
class GridConfig:
    input_dim: int = 3                          # D, coordinates per point
    num_levels: int = 16                        # L, resolution levels
    level_dim: int = 2                          # C, features per level
    base_resolution: int = 16                   # H, resolution of the coarsest level
    log2_hashmap_size: int = 19                 # cap on a level's table rows, as a power of two
    desired_resolution: Optional[float] = None  # finest resolution; when set, it fixes per_level_scale
    per_level_scale: float = 2.0                # b, resolution growth per level (used when desired_resolution is None)
    gridtype: str = "hash"                      # "hash" or "tiled": how levels larger than their table are indexed
    align_corners: bool = False                 # True: grid vertices on the box corners; False: cell centres (+½)


@dataclass(frozen=True)
class GridLevels:
    """Per-level layout of a grid encoding, as plain numbers (hashable, so backends can cache by it)."""

    input_dim: int
    level_dim: int
    gridtype: str
    align_corners: bool
    offsets: Tuple[int, ...]       # first table row of each level, plus the total row count
    scales: Tuple[float, ...]      # s_l, float32 values
    resolutions: Tuple[int, ...]   # R_l

    @property
    def num_levels(self):
        return len(self.scales)

    @property
    def output_dim(self):
        return self.num_levels * self.level_dim

    def table_size(self, level):
        """Return T_l, the number of table rows of one level."""
        return self.offsets[level + 1] - self.offsets[level]

    def axis_size(self, level):
        """Return S, the number of grid vertices per axis the dense index assumes."""
        return self.resolutions[level] + (0 if self.align_corners else 1)

    def dense_dims(self, level):
        """Return how many coordinates enter the dense index before its stride outgrows the table."""
        stride, dims = 1, 0
        while dims < self.input_dim and stride <= self.table_size(level):
            stride *= self.axis_size(level)
            dims += 1
        return dims

    def is_hashed(self, level):
        """Return whether a level uses the XOR hash instead of the dense index."""
        return self.gridtype == "hash" and self.axis_size(level) ** self.dense_dims(level) > self.table_size(level)

    def position_shift(self):
        """Return the ½ cell offset of torch-ngp's default alignment, or 0 with align_corners."""
        return 0.0 if self.align_corners else 0.5


def per_level_scale_of(config):
    """Return b: from desired_resolution when given (torch-ngp: (R_max / H)^(1/(L−1))), else the configured one."""
    if config.desired_resolution is None:
        return float(config.per_level_scale)
    return float(np.exp2(np.log2(config.desired_resolution / config.base_resolution) / (config.num_levels - 1)))


def level_scales(num_levels, per_level_scale, base_resolution):
    """Return s_l for every level, rounded through float32 at each step like the CUDA kernel's exp2f."""
    log2_scale = np.float32(np.log2(per_level_scale))
    scales = []
    for level in range(num_levels):
        growth = np.exp2(np.float32(level) * log2_scale, dtype=np.float32)
        scales.append(float(np.float32(growth * np.float32(base_resolution)) - np.float32(1.0)))
    return tuple(scales)


def table_offsets(config, per_level_scale):
    """Return each level's first table row and the total, sized as torch-ngp's GridEncoder sizes them."""
    max_rows = 2 ** config.log2_hashmap_size
    offsets = [0]
    for level in range(config.num_levels):
        resolution = int(np.ceil(config.base_resolution * per_level_scale ** level))
        per_axis = resolution if config.align_corners else resolution + 1
        rows = min(max_rows, per_axis ** config.input_dim)
        offsets.append(offsets[-1] + int(math.ceil(rows / 8) * 8))
    return tuple(offsets)


def grid_levels(config):
    """Return the GridLevels of a GridConfig (checks gridtype)."""
    check_choice("gridtype", config.gridtype, GRID_TYPES)
    if config.input_dim > len(HASH_PRIMES):
        raise ValueError(f"input_dim must be at most {len(HASH_PRIMES)}, got {config.input_dim}")
    scale = per_level_scale_of(config)
    scales = level_scales(config.num_levels, scale, config.base_resolution)
    return GridLevels(
        input_dim=config.input_dim,
        level_dim=config.level_dim,
        gridtype=config.gridtype,
        align_corners=config.align_corners,
        offsets=table_offsets(config, scale),
        scales=scales,
        resolutions=tuple(int(math.ceil(s)) + 1 for s in scales),
    )


def _per_corner(lower_terms, upper_terms, combine):
    """Return (P, 2^D) values combining per-dimension (P,) terms of the lower and upper corner.

    Corner k takes the upper term in dimension d when bit d of k is set, as torch-ngp orders corners;
    terms are combined left to right in dimension order (the kernel's rounding order for weights).
    """
    dims = len(lower_terms)
    result = None
    for dim in range(dims):
        pair = torch.stack([lower_terms[dim], upper_terms[dim]], dim=-1)  # (P, 2)
        pair = pair.view(pair.shape[0], *([1] * (dims - 1 - dim)), 2, *([1] * dim))
        result = pair if result is None else combine(result, pair)
    return result.reshape(result.shape[0], -1)


def corner_rows(levels, level, lower):
    """Return the global table rows (P, 2^D) int64 of the corners of cells with lower corners (P, D) int64."""
    dims = range(levels.input_dim)
    if levels.is_hashed(level):
        lower_terms = [(lower[:, d] * HASH_PRIMES[d]) & _UINT32 for d in dims]
        upper_terms = [((lower[:, d] + 1) * HASH_PRIMES[d]) & _UINT32 for d in dims]
        index = _per_corner(lower_terms, upper_terms, torch.bitwise_xor)
    else:
        strides = [levels.axis_size(level) ** d if d < levels.dense_dims(level) else 0 for d in dims]
        lower_terms = [lower[:, d] * strides[d] for d in dims]
        upper_terms = [(lower[:, d] + 1) * strides[d] for d in dims]
        index = _per_corner(lower_terms, upper_terms, torch.add) & _UINT32
    return levels.offsets[level] + index % levels.table_size(level)


def level_corners(levels, level, inputs):
    """Return (rows (P, 2^D) int64, weights (P, 2^D)) of the interpolation corners of points (P, D) in [0, 1]."""
    position = inputs * levels.scales[level] + levels.position_shift()
    lower = torch.floor(position)
    frac = position - lower  # its gradient is the level's scale, as torch-ngp's dy_dx
    columns = range(levels.input_dim)
    weights = _per_corner([1 - frac[:, d] for d in columns], [frac[:, d] for d in columns], torch.mul)
    return corner_rows(levels, level, lower.long()), weights


def grid_encode_reference(inputs, embeddings, levels, scene=None):
    """Return the grid encoding (P, L·C) of points (P, D) in [0, 1] from the table embeddings (rows, C).

    Differentiable in both inputs and embeddings through ordinary autograd; any float dtype. All
    levels are gathered at once so the table gradient is one scatter into one buffer.

    Several scenes' grids at once: embeddings (S·rows, C) stacks S tables of rows = levels.offsets[-1]
    rows each, and scene (P,) int gives each point's scene, whose rows start at scene·rows.
    """
    inside = ((inputs >= 0) & (inputs <= 1)).all(dim=-1, keepdim=True)  # (P, 1)
    corners = [level_corners(levels, level, inputs) for level in range(levels.num_levels)]
    rows = torch.stack([r for r, _ in corners], dim=1)        # (P, L, 2^D)
    if scene is not None:
        rows = rows + scene.long().view(-1, 1, 1) * levels.offsets[-1]
    weights = torch.stack([w for _, w in corners], dim=1)     # (P, L, 2^D)
    values = embeddings.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # (P, L, 2^D, C)
    features = (weights.unsqueeze(-2) @ values).squeeze(-2)  # (P, L, C)
    features = features.reshape(inputs.shape[0], -1)
    return torch.where(inside, features, torch.zeros_like(features))

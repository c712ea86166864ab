"""tiny-cuda-nn backend for the 'hash' grid encoding, computing the reference's function on our table.

tiny-cuda-nn lays a multi-level grid out differently from torch-ngp (R_l vertices per axis instead of
R_l + 1, other table sizes), so one tcnn encoding of all levels would be a different function of
different parameters. One single-level tcnn HashGrid per level is the same function: with base
resolution S = R_l + 1 its scale is exactly R_l and its table is min(2^k, S^3) rows like ours, and
rescaling the points by s_l / R_l puts them at torch-ngp's grid positions. tcnn's 'Tiled' grid wraps
differently from torch-ngp's 'tiled', and it always uses the ½ cell offset, so only 'hash' with
align_corners=False is offered. Needs CUDA and float32.
"""

import functools
import math

import torch


def tcnn_available():
    """Return whether tinycudann imports (it needs a CUDA build of it)."""
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        return False
    return True


def _check_layout(levels):
    if levels.gridtype != "hash" or levels.align_corners:
        raise ValueError(
            "the tcnn grid backend reproduces gridtype='hash' with align_corners=False only "
            f"(got gridtype={levels.gridtype!r}, align_corners={levels.align_corners}); use backend='triton' or 'torch'"
        )


@functools.lru_cache(maxsize=None)
def _level_encodings(levels, device):
    """Return one single-level tcnn HashGrid per level, on a CUDA device, whose tables match ours row for row."""
    import tinycudann as tcnn

    encodings = []
    with torch.cuda.device(device):
        for level in range(levels.num_levels):
            rows = levels.table_size(level)
            config = {
                "otype": "HashGrid",
                "n_levels": 1,
                "n_features_per_level": levels.level_dim,
                "log2_hashmap_size": max(0, math.ceil(math.log2(rows))),
                "base_resolution": levels.axis_size(level),
                "per_level_scale": 1.0,
            }
            encoding = tcnn.Encoding(levels.input_dim, config, dtype=torch.float32)
            if encoding.params.numel() != rows * levels.level_dim:
                raise ValueError(
                    f"tcnn sized level {level} as {encoding.params.numel() // levels.level_dim} rows, ours has {rows}"
                )
            encodings.append(encoding)
    return tuple(encodings)


def grid_encode_tcnn(inputs, embeddings, levels):
    """Return the grid encoding (P, L·C) of points (P, D) in [0, 1] with tiny-cuda-nn, float32 on CUDA."""
    _check_layout(levels)
    if not inputs.is_cuda or inputs.dtype != torch.float32 or embeddings.dtype != torch.float32:
        raise TypeError(f"the tcnn grid backend needs float32 CUDA tensors, got {inputs.dtype} on {inputs.device}")
    inside = ((inputs >= 0) & (inputs <= 1)).all(dim=-1, keepdim=True)  # tcnn does not zero points outside
    features = []
    for level, encoding in enumerate(_level_encodings(levels, inputs.device)):
        table = embeddings[levels.offsets[level]:levels.offsets[level + 1]].reshape(-1)
        rescaled = inputs * (levels.scales[level] / levels.resolutions[level])
        level_features = torch.func.functional_call(encoding, {"params": table}, (rescaled,))
        features.append(torch.where(inside, level_features, torch.zeros_like(level_features)))
    return torch.cat(features, dim=-1)

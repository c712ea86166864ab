import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefusion.external.gridencoder import (GridConfig, GridEncoder, StackedGridEncoder, grid_encode, grid_levels,
                                              resolve_backend, triton_available)
from sparsefusion.external.gridencoder.reference import level_corners
from sparsefusion.external.gridencoder.tcnn_backend import tcnn_available

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
UPSTREAM_GRID = GridConfig(num_levels=16, level_dim=2, base_resolution=16, log2_hashmap_size=16,
                           desired_resolution=2048 * 4, gridtype="tiled")

# base 4, per-level scale 2: scales 3 and 7 exactly; level 0 (5^3 = 125 vertices) fits its 128 rows,
# level 1 (9^3 = 729 vertices) does not, and only two coordinates enter its tiled index (9^2 > 64).
SMALL = dict(num_levels=2, level_dim=2, base_resolution=4, per_level_scale=2.0)


def hand_encoding(x, table, gridtype, log2_rows):
    """torch-ngp's grid encoding of one point, written out with Python integers for SMALL."""
    primes = (1, 2654435761, 805459861)
    features, first_row = [], 0
    for level in range(2):
        scale = 4 * 2**level - 1
        per_axis = scale + 2  # R + 1 vertices, R = scale + 1
        rows = math.ceil(min(2**log2_rows, per_axis**3) / 8) * 8
        position = [v * scale + 0.5 for v in x]
        lower = [math.floor(p) for p in position]
        frac = [p - g for p, g in zip(position, lower)]
        value = np.zeros(2)
        for corner in range(8):
            up = [(corner >> d) & 1 for d in range(3)]
            g = [lo + u for lo, u in zip(lower, up)]
            weight = np.prod([f if u else 1 - f for f, u in zip(frac, up)])
            index, stride, dims = 0, 1, 0
            while dims < 3 and stride <= rows:
                index, stride, dims = index + g[dims] * stride, stride * per_axis, dims + 1
            if gridtype == "hash" and stride > rows:
                index = 0
                for d in range(3):
                    index ^= (g[d] * primes[d]) % 2**32
            value += weight * table[first_row + index % rows]
        features.append(value)
        first_row += rows
    return np.concatenate(features)


def test_upstream_layout_matches_torch_ngp():
    levels = grid_levels(UPSTREAM_GRID)
    # (R+1)^3 rows rounded up to 8 for the three coarse levels, 2^16 for the 13 others
    sizes = [4920, 17576, 54872] + [65536] * 13
    assert levels.offsets == tuple(np.concatenate([[0], np.cumsum(sizes)]))
    growth = 2 ** (9 / 15)  # (8192 / 16)^(1/15)
    expected = [math.ceil(16 * growth**level) for level in range(16)]
    assert list(levels.resolutions) == expected
    # every scale is an exact power of two minus one (exp2 of an integer: exact on any device) or far
    # from an integer, so a last-digit difference in CUDA's exp2f cannot change any R_l
    assert [level for level, s in enumerate(levels.scales) if s == round(s)] == [0, 5, 10, 15]
    assert all(abs(s - round(s)) > 1e-3 for s in levels.scales if s != round(s))
    encoder = GridEncoder(UPSTREAM_GRID)
    assert encoder.embeddings.shape == (929336, 2) and encoder.output_dim == 32
    assert encoder.offsets.dtype == torch.int32 and encoder.offsets.tolist() == list(levels.offsets)
    assert set(encoder.state_dict()) == {"embeddings", "offsets"}


@pytest.mark.parametrize("gridtype,log2_rows", [("hash", 7), ("tiled", 7), ("tiled", 6), ("hash", 6)])
def test_reference_matches_hand_computation(gridtype, log2_rows):
    levels = grid_levels(GridConfig(**SMALL, log2_hashmap_size=log2_rows, gridtype=gridtype))
    table = torch.randn(levels.offsets[-1], 2, dtype=torch.float64)
    points = torch.tensor([[0.1, 0.52, 0.93], [0.0, 1.0, 0.5], [0.77, 0.25, 0.31], [1.0, 1.0, 1.0]],
                          dtype=torch.float64)
    features = grid_encode(points, table, levels, backend="torch")
    expected = [hand_encoding(p.tolist(), table.numpy(), gridtype, log2_rows) for p in points]
    np.testing.assert_allclose(features.numpy(), np.stack(expected), rtol=1e-12, atol=1e-12)


def test_corner_weights_and_rows_by_hand():
    levels = grid_levels(GridConfig(**SMALL, log2_hashmap_size=7, gridtype="tiled"))
    rows, weights = level_corners(levels, 0, torch.tensor([[0.1, 0.5, 0.9]], dtype=torch.float64))
    # position x·3 + ½ = (0.8, 2.0, 3.2): cell (0, 2, 3), fractions (0.8, 0, 0.2); 5 vertices per axis
    cell_row = 0 + 2 * 5 + 3 * 25
    for corner in range(8):
        ux, uy, uz = corner & 1, corner >> 1 & 1, corner >> 2 & 1
        assert rows[0, corner] == cell_row + ux + 5 * uy + 25 * uz
        expected = (0.8 if ux else 0.2) * (0.0 if uy else 1.0) * (0.2 if uz else 0.8)
        assert weights[0, corner].item() == pytest.approx(expected, abs=1e-12)
    assert weights.sum().item() == pytest.approx(1.0)


def test_tiled_and_hash_agree_where_nothing_wraps():
    roomy = dict(num_levels=3, base_resolution=4, per_level_scale=1.5, log2_hashmap_size=12)  # 10^3 ≤ 4096
    tiled, hashed = (grid_levels(GridConfig(**roomy, gridtype=t)) for t in ("tiled", "hash"))
    assert tiled.offsets == hashed.offsets
    assert not any(hashed.is_hashed(level) for level in range(3))
    table = torch.randn(tiled.offsets[-1], 2, dtype=torch.float64)
    points = torch.rand(200, 3, dtype=torch.float64)
    assert torch.equal(grid_encode(points, table, tiled, "torch"), grid_encode(points, table, hashed, "torch"))
    # ... and differ where a level outgrows its table
    cramped = dict(roomy, log2_hashmap_size=8)
    tiled, hashed = (grid_levels(GridConfig(**cramped, gridtype=t)) for t in ("tiled", "hash"))
    table = torch.randn(tiled.offsets[-1], 2, dtype=torch.float64)
    assert not torch.allclose(grid_encode(points, table, tiled, "torch"), grid_encode(points, table, hashed, "torch"))


def test_points_outside_the_box_encode_to_zero_without_gradient():
    encoder = GridEncoder(GridConfig(**SMALL, log2_hashmap_size=7), backend="torch")
    points = torch.tensor([[0.0, 0.0, 4.2], [-4.1, 0.0, 0.0], [1.0, 2.0, 3.0]])
    features = encoder(points, bound=4)
    assert torch.equal(features[:2], torch.zeros(2, 4)) and features[2].abs().sum() > 0
    features[:2].sum().backward()
    assert torch.equal(encoder.embeddings.grad, torch.zeros_like(encoder.embeddings))


def test_reference_gradients_match_finite_differences():
    levels = grid_levels(GridConfig(**SMALL, log2_hashmap_size=6, gridtype="hash"))
    table = torch.randn(levels.offsets[-1], 2, dtype=torch.float64, requires_grad=True)
    points = (0.05 + 0.9 * torch.rand(6, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, t: grid_encode(x, t, levels, "torch"), (points, table), eps=1e-7,
                                    fast_mode=True)


def test_float32_reference_agrees_with_float64():
    # coarse levels: float32 rounding of the grid position (≈ scale · 2^-24) stays negligible
    levels = grid_levels(GridConfig(**SMALL, log2_hashmap_size=6, gridtype="tiled"))
    table = torch.randn(levels.offsets[-1], 2)
    points = torch.rand(1000, 3)
    exact = grid_encode(points.double(), table.double(), levels, "torch")
    single = grid_encode(points, table, levels, "torch")
    assert single.dtype == torch.float32
    assert (single.double() - exact).abs().max() < 1e-5 * exact.abs().max()


def test_backend_names_are_checked_and_auto_picks_torch_on_cpu():
    levels = grid_levels(GridConfig(**SMALL))
    assert resolve_backend("auto", torch.rand(4, 3), levels) == "torch"
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', 'tcnn'"):
        grid_encode(torch.rand(4, 3), torch.zeros(levels.offsets[-1], 2), levels, backend="cuda")
    with pytest.raises(ValueError, match="gridtype must be one of 'hash', 'tiled'"):
        grid_levels(GridConfig(gridtype="dense"))


def compare_triton_with_reference(device, n_points, configs):
    """Return, per config, the largest error of Triton's outputs and gradients relative to the reference's."""
    from sparsefusion.external.gridencoder.triton_kernel import grid_encode_triton

    generator = torch.Generator().manual_seed(0)
    errors = []
    for config in configs:
        levels = grid_levels(config)
        table = torch.randn(levels.offsets[-1], config.level_dim, generator=generator).to(device)
        points = torch.rand(n_points, 3, generator=generator)
        points[:3] = torch.tensor([[1.0, 0.5, 0.0], [1.01, 0.5, 0.5], [0.5, -0.02, 0.5]])  # edges and outside
        points = points.to(device)
        grad_out = torch.randn(n_points, levels.output_dim, generator=generator).to(device)
        results = []
        for encode in (lambda x, t: grid_encode(x, t, levels, "torch"), lambda x, t: grid_encode_triton(x, t, levels)):
            x, t = points.clone().requires_grad_(), table.clone().requires_grad_()
            out = encode(x, t)
            results.append((out, *torch.autograd.grad(out, (x, t), grad_out)))
        errors.append([((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results[1], results[0])])
    return errors


TRITON_CONFIGS = [
    UPSTREAM_GRID,
    GridConfig(num_levels=5, level_dim=4, base_resolution=5, per_level_scale=1.9, log2_hashmap_size=9, gridtype="hash"),
    GridConfig(num_levels=3, level_dim=1, base_resolution=7, log2_hashmap_size=10, gridtype="tiled",
               align_corners=True),
]


def in_triton_interpreter(call):
    """Return the JSON result of call, an expression over this module as t, run in a process with TRITON_INTERPRET=1.

    The interpreter is chosen when Triton is imported, so it needs a fresh process.
    """
    script = f"import json, torch, tests.test_gridencoder as t\nprint(json.dumps(t.{call}))\n"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_cpu_interpreter():
    errors = in_triton_interpreter("compare_triton_with_reference('cpu', 37, t.TRITON_CONFIGS)")
    assert len(errors) == len(TRITON_CONFIGS) and max(max(e) for e in errors) < 1e-5, errors


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and triton")
def test_triton_kernel_matches_reference_on_cuda():
    errors = compare_triton_with_reference("cuda", 100_003, TRITON_CONFIGS)
    assert max(max(e) for e in errors) < 1e-5, errors
    levels = grid_levels(UPSTREAM_GRID)
    assert resolve_backend("auto", torch.rand(4, 3, device="cuda"), levels) == "triton"


@pytest.mark.skipif(not (CUDA and tcnn_available()), reason="needs CUDA and tinycudann")
def test_tcnn_backend_matches_reference_for_hash_grids():
    config = GridConfig(num_levels=16, level_dim=2, base_resolution=16, log2_hashmap_size=16,
                        desired_resolution=8192, gridtype="hash")
    levels = grid_levels(config)
    table = torch.randn(levels.offsets[-1], 2, device="cuda")
    points = torch.rand(10_001, 3, device="cuda")
    expected = grid_encode(points, table, levels, "torch")
    assert (grid_encode(points, table, levels, "tcnn") - expected).abs().max() < 1e-5 * expected.abs().max()
    with pytest.raises(ValueError, match="gridtype='hash'"):
        grid_encode(points, table, grid_levels(UPSTREAM_GRID), "tcnn")


# ---------------------------------------------------------------------------------------------
# Several scenes' grids in one call


def compare_stacked_with_separate(device, backend, n_points, configs, scenes=3, dtype=torch.float32):
    """Return, per config, the largest error of a stacked encoding (one call over scenes' stacked tables, with a
    per-point scene index) and its gradients, relative to each scene encoded alone by the reference."""
    generator = torch.Generator().manual_seed(1)
    errors = []
    for config in configs:
        levels = grid_levels(config)
        tables = torch.randn(scenes, levels.offsets[-1], config.level_dim, generator=generator, dtype=dtype)
        points = torch.rand(scenes, n_points, 3, generator=generator, dtype=dtype)
        points[:, :2] = torch.tensor([[1.0, 0.5, 0.0], [0.5, -0.02, 0.5]], dtype=dtype)  # an edge, outside
        grad_out = torch.randn(scenes, n_points, levels.output_dim, generator=generator, dtype=dtype)
        tables, points, grad_out = tables.to(device), points.to(device), grad_out.to(device)

        x, t = points.clone().requires_grad_(), tables.flatten(0, 1).clone().requires_grad_()  # (S·rows, C)
        scene = torch.arange(scenes, device=device).repeat_interleave(n_points).view(scenes, n_points)
        out = grid_encode(x, t, levels, backend, scene=scene)
        stacked = (out, *torch.autograd.grad(out, (x, t), grad_out))
        x, t = points.clone().requires_grad_(), tables.clone().requires_grad_()
        out = torch.stack([grid_encode(x[s], t[s], levels, "torch") for s in range(scenes)])
        grad_x, grad_t = torch.autograd.grad(out, (x, t), grad_out)
        separate = (out, grad_x, grad_t.flatten(0, 1))
        errors.append([((a - b).abs().max() / b.abs().max()).item() for a, b in zip(stacked, separate)])
    return errors


STACKED_CONFIGS = [
    GridConfig(**SMALL, log2_hashmap_size=7, gridtype="tiled"),
    GridConfig(num_levels=5, level_dim=4, base_resolution=5, per_level_scale=1.9, log2_hashmap_size=9, gridtype="hash"),
]


def test_stacked_scenes_encode_as_each_scene_alone_with_the_reference():
    errors = compare_stacked_with_separate("cpu", "torch", 50, STACKED_CONFIGS, dtype=torch.float64)
    assert max(max(e) for e in errors) < 1e-12, errors


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_stacked_scenes_encode_as_each_scene_alone_with_the_triton_kernel_in_the_cpu_interpreter():
    errors = in_triton_interpreter("compare_stacked_with_separate('cpu', 'triton', 37, t.STACKED_CONFIGS)")
    assert len(errors) == len(STACKED_CONFIGS) and max(max(e) for e in errors) < 1e-5, errors


@pytest.mark.skipif(not (CUDA and triton_available()), reason="needs CUDA and triton")
def test_stacked_scenes_encode_as_each_scene_alone_with_the_triton_kernel_on_cuda():
    errors = compare_stacked_with_separate("cuda", "triton", 10_007, STACKED_CONFIGS + [UPSTREAM_GRID], scenes=4)
    assert max(max(e) for e in errors) < 1e-5, errors


def test_a_stacked_grid_encoder_holds_the_scenes_tables_and_encodes_each_through_its_own():
    config = GridConfig(**SMALL, log2_hashmap_size=7)
    encoders = [GridEncoder(config, backend="torch") for _ in range(3)]
    stacked = StackedGridEncoder(encoders)
    assert stacked.embeddings.shape == (3 * encoders[0].embeddings.shape[0], 2)
    points = 8 * torch.rand(3, 20, 3) - 4
    features = stacked(points, bound=4)
    for s, encoder in enumerate(encoders):
        assert torch.equal(stacked.scene_table(s), encoder.embeddings)
        assert torch.equal(features[s], encoder(points[s], bound=4))
    with pytest.raises(ValueError, match="one configuration"):
        StackedGridEncoder([encoders[0], GridEncoder(GridConfig(**SMALL, log2_hashmap_size=6))])


def test_the_tcnn_backend_refuses_several_scenes_in_one_line():
    levels = grid_levels(GridConfig(**SMALL, log2_hashmap_size=7))
    with pytest.raises(ValueError, match="tcnn grid backend encodes one scene's grid at a time"):
        grid_encode(torch.rand(4, 3), torch.zeros(2 * levels.offsets[-1], 2), levels, "tcnn",
                    scene=torch.tensor([0, 0, 1, 1]))

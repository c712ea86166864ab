"""Fused Triton kernels for the 3-D grid encoding: forward, and backward into the table and (optionally) the points.

Computes reference.grid_encode_reference for input_dim 3 in float32. One program handles a block of
points at one level (grid = (point blocks, levels)), so each level's table is touched by its own
programs; the table gradient is scattered with atomic adds, so its summation order (not its value)
varies from run to run. The gradient with respect to the points is computed only when they require
it: upstream's distillation never needs it.

Several scenes' grids in one launch: the table stacks S scenes' tables (S·rows, C) and a per-point
scene index moves each point's rows by scene·rows (HAS_SCENE); without it the kernels are unchanged.
"""

import functools

import torch
import triton
import triton.language as tl

_BLOCK = 128
_META_INT = 5  # per level: first row, table size, vertices per axis, dense dims, hashed flag


@functools.lru_cache(maxsize=None)
def _level_tables(levels, device):
    """Return the per-level constants on a device: ((L, 5) int64, (L,) float32), built once per layout."""
    ints = [
        [levels.offsets[level], levels.table_size(level), levels.axis_size(level), levels.dense_dims(level),
         int(levels.is_hashed(level))]
        for level in range(levels.num_levels)
    ]
    return (
        torch.tensor(ints, dtype=torch.int64, device=device),
        torch.tensor(levels.scales, dtype=torch.float32, device=device),
    )


# No fused multiply-adds: at the finest level (scale ~8191) a fused x·s + shift rounds once where the
# PyTorch reference rounds twice, which moves interpolation weights by ~1e-3; unfused, both agree.
_FP_FUSION = False

@triton.jit
def _corner_row(gx, gy, gz, row0, size, axis, dims, hashed):
    """Table row of integer corners: partial dense index or XOR hash, modulo the table size."""
    dense = gx
    dense = tl.where(dims > 1, dense + gy * axis, dense)
    dense = tl.where(dims > 2, dense + gz * axis * axis, dense)
    dense = dense & 0xFFFFFFFF
    # reference.HASH_PRIMES[:3]; uint32 products emulated in int64
    hashed_index = (
        ((gx * 1) & 0xFFFFFFFF) ^ ((gy * 2654435761) & 0xFFFFFFFF) ^ ((gz * 805459861) & 0xFFFFFFFF)
    )
    index = tl.where(hashed != 0, hashed_index, dense).to(tl.uint32)  # < 2^32: a 32-bit remainder suffices
    return row0 + (index % size.to(tl.uint32)).to(tl.int64)


@triton.jit
def _level_setup(x_ptr, scene_ptr, meta_ptr, scale_ptr, shift, n_points, scene_rows,
                 HAS_SCENE: tl.constexpr, BLOCK: tl.constexpr):
    """Load one block of points and one level's constants; return positions split into corner and fraction.

    With HAS_SCENE the level's first row becomes per point: moved by the point's scene × scene_rows.
    """
    block = tl.program_id(0)
    level = tl.program_id(1)
    points = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: P·L·C may pass 2^31
    valid = points < n_points
    x = tl.load(x_ptr + points * 3 + 0, mask=valid, other=0.0)
    y = tl.load(x_ptr + points * 3 + 1, mask=valid, other=0.0)
    z = tl.load(x_ptr + points * 3 + 2, mask=valid, other=0.0)
    inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1) & (z >= 0) & (z <= 1)
    row0 = tl.load(meta_ptr + level * 5 + 0)
    if HAS_SCENE:
        row0 = row0 + tl.load(scene_ptr + points, mask=valid, other=0).to(tl.int64) * scene_rows
    size = tl.load(meta_ptr + level * 5 + 1)
    axis = tl.load(meta_ptr + level * 5 + 2)
    dims = tl.load(meta_ptr + level * 5 + 3)
    hashed = tl.load(meta_ptr + level * 5 + 4)
    scale = tl.load(scale_ptr + level)
    px = x * scale + shift
    py = y * scale + shift
    pz = z * scale + shift
    lx = tl.floor(px)
    ly = tl.floor(py)
    lz = tl.floor(pz)
    return (level, points, valid, inside, row0, size, axis, dims, hashed, scale,
            lx.to(tl.int64), ly.to(tl.int64), lz.to(tl.int64), px - lx, py - ly, pz - lz)


@triton.jit
def _corner(corner: tl.constexpr, gx, gy, gz, fx, fy, fz, row0, size, axis, dims, hashed):
    """Return the trilinear weights along x, y, z of one of the 8 cell corners, and its table row."""
    ux = corner & 1
    uy = (corner >> 1) & 1
    uz = (corner >> 2) & 1
    wx = fx if ux else 1 - fx
    wy = fy if uy else 1 - fy
    wz = fz if uz else 1 - fz
    return wx, wy, wz, _corner_row(gx + ux, gy + uy, gz + uz, row0, size, axis, dims, hashed)


@triton.jit
def _grid_forward_kernel(x_ptr, scene_ptr, table_ptr, meta_ptr, scale_ptr, out_ptr, n_points, n_levels, shift,
                         scene_rows, C: tl.constexpr, HAS_SCENE: tl.constexpr, BLOCK: tl.constexpr):
    (level, points, valid, inside, row0, size, axis, dims, hashed, scale,
     gx, gy, gz, fx, fy, fz) = _level_setup(x_ptr, scene_ptr, meta_ptr, scale_ptr, shift, n_points, scene_rows,
                                            HAS_SCENE, BLOCK)
    channels = tl.arange(0, C)
    load_mask = (valid & inside)[:, None]
    acc = tl.zeros((BLOCK, C), dtype=tl.float32)
    for corner in tl.static_range(8):
        wx, wy, wz, row = _corner(corner, gx, gy, gz, fx, fy, fz, row0, size, axis, dims, hashed)
        values = tl.load(table_ptr + row[:, None] * C + channels[None, :], mask=load_mask, other=0.0)
        acc += (wx * wy * wz)[:, None] * values
    out = out_ptr + points[:, None] * (n_levels * C) + level * C + channels[None, :]
    tl.store(out, acc, mask=valid[:, None])


@triton.jit
def _grid_backward_kernel(x_ptr, scene_ptr, table_ptr, meta_ptr, scale_ptr, grad_out_ptr, grad_table_ptr,
                          grad_x_ptr, n_points, n_levels, shift, scene_rows,
                          C: tl.constexpr, NEED_X_GRAD: tl.constexpr, HAS_SCENE: tl.constexpr, BLOCK: tl.constexpr):
    (level, points, valid, inside, row0, size, axis, dims, hashed, scale,
     gx, gy, gz, fx, fy, fz) = _level_setup(x_ptr, scene_ptr, meta_ptr, scale_ptr, shift, n_points, scene_rows,
                                            HAS_SCENE, BLOCK)
    channels = tl.arange(0, C)
    mask = (valid & inside)[:, None]
    grad_out = tl.load(grad_out_ptr + points[:, None] * (n_levels * C) + level * C + channels[None, :],
                       mask=mask, other=0.0)
    dfx = tl.zeros((BLOCK,), dtype=tl.float32)
    dfy = tl.zeros((BLOCK,), dtype=tl.float32)
    dfz = tl.zeros((BLOCK,), dtype=tl.float32)
    for corner in tl.static_range(8):
        wx, wy, wz, row = _corner(corner, gx, gy, gz, fx, fy, fz, row0, size, axis, dims, hashed)
        offsets = row[:, None] * C + channels[None, :]
        tl.atomic_add(grad_table_ptr + offsets, (wx * wy * wz)[:, None] * grad_out, mask=mask)
        if NEED_X_GRAD:
            values = tl.load(table_ptr + offsets, mask=mask, other=0.0)
            along = tl.sum(values * grad_out, axis=1)
            # d(weight)/d(fraction) is ±(product of the other two factors)
            dfx += along * (wy * wz if corner & 1 else -(wy * wz))
            dfy += along * (wx * wz if (corner >> 1) & 1 else -(wx * wz))
            dfz += along * (wx * wy if (corner >> 2) & 1 else -(wx * wy))
    if NEED_X_GRAD:
        base = grad_x_ptr + (points * n_levels + level) * 3
        tl.store(base + 0, dfx * scale, mask=valid)
        tl.store(base + 1, dfy * scale, mask=valid)
        tl.store(base + 2, dfz * scale, mask=valid)


def _check_operands(inputs, embeddings, levels):
    if levels.input_dim != 3 or inputs.shape[-1] != 3:
        raise ValueError(f"the Triton grid encoder handles 3-D points only, got input_dim {levels.input_dim}")
    if inputs.dtype != torch.float32 or embeddings.dtype != torch.float32:
        raise TypeError(
            f"the Triton grid encoder computes in float32; got inputs {inputs.dtype}, embeddings {embeddings.dtype} "
            "(use backend='torch' for other dtypes)"
        )
    if inputs.device != embeddings.device:
        raise ValueError(f"inputs on {inputs.device} but embeddings on {embeddings.device}")
    if levels.level_dim & (levels.level_dim - 1):
        raise ValueError(f"the Triton grid encoder needs level_dim a power of two, got {levels.level_dim}")


class _GridEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, embeddings, levels, scene):
        _check_operands(inputs, embeddings, levels)
        inputs = inputs.contiguous()
        embeddings = embeddings.contiguous()
        has_scene = scene is not None
        scene = scene.contiguous() if has_scene else inputs  # a dummy pointer the kernels never read
        meta, scales = _level_tables(levels, inputs.device)
        n_points, n_levels, channels = inputs.shape[0], levels.num_levels, levels.level_dim
        out = torch.empty(n_points, n_levels * channels, device=inputs.device, dtype=torch.float32)
        if n_points:
            grid = (triton.cdiv(n_points, _BLOCK), n_levels)
            _grid_forward_kernel[grid](inputs, scene, embeddings, meta, scales, out, n_points, n_levels,
                                       levels.position_shift(), levels.offsets[-1], C=channels, HAS_SCENE=has_scene,
                                       BLOCK=_BLOCK, enable_fp_fusion=_FP_FUSION)
        ctx.save_for_backward(inputs, embeddings, scene)
        ctx.levels, ctx.has_scene = levels, has_scene
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, embeddings, scene = ctx.saved_tensors
        levels = ctx.levels
        meta, scales = _level_tables(levels, inputs.device)
        n_points, n_levels, channels = inputs.shape[0], levels.num_levels, levels.level_dim
        need_x_grad = ctx.needs_input_grad[0]
        grad_table = torch.zeros_like(embeddings)
        grad_x_levels = torch.zeros(n_points if need_x_grad else 1, n_levels, 3, device=inputs.device)
        if n_points:
            grid = (triton.cdiv(n_points, _BLOCK), n_levels)
            _grid_backward_kernel[grid](inputs, scene, embeddings, meta, scales, grad_out.contiguous(), grad_table,
                                        grad_x_levels, n_points, n_levels, levels.position_shift(),
                                        levels.offsets[-1], C=channels, NEED_X_GRAD=need_x_grad,
                                        HAS_SCENE=ctx.has_scene, BLOCK=_BLOCK, enable_fp_fusion=_FP_FUSION)
        grad_inputs = grad_x_levels.sum(dim=1) if need_x_grad else None
        return grad_inputs, grad_table, None, None


def grid_encode_triton(inputs, embeddings, levels, scene=None):
    """Return the grid encoding (P, L·C) of points (P, 3) in [0, 1], float32, by the fused Triton kernels.

    scene (P,) int32/int64, if given: each point's scene in a stack of scene tables (S·rows, C).
    """
    return _GridEncodeTriton.apply(inputs, embeddings, levels, scene)


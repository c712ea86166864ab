"""Benchmark the grid encoder backends and one NeRF training iteration; check fast paths against the reference.

    python benchmarks/bench_nerf.py --out bench_nerf.json                 # GPU: 2^21 points, 128×128 rays
    python benchmarks/bench_nerf.py --device cpu --small --out cpu.json   # a quick run anywhere
    TRITON_INTERPRET=1 python benchmarks/bench_nerf.py --device cpu --small --points 256 --rays 4  # + Triton

Encoder: forward and forward+backward throughput (points/s) of each backend that runs on the device,
for upstream's 'tiled' grid (16 levels × 2, 2^16 rows, finest resolution 8192) and the 'hash' grid
(the one tiny-cuda-nn can reproduce). Training: one distillation-style step at 128×128 rays × (64
stratified + 64 importance) samples — render, MSE + silhouette loss, backward, Adam — per backend, in
float32 and (CUDA) under fp16 autocast. Times are medians of repeats after warm-up, with the device
synchronised around each; errors are measures.relative_error: ‖fast − reference‖ / ‖reference‖.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsefusion.external.gridencoder import grid_encode, grid_levels, triton_available  # noqa: E402
from sparsefusion.external.gridencoder.tcnn_backend import tcnn_available  # noqa: E402
from sparsefusion.external.nerf_network import NeRFConfig, NeRFNetwork  # noqa: E402
from sparsefusion.external.nerf_renderer import NeRFRenderConfig  # noqa: E402
from measures import median_seconds, relative_error  # noqa: E402

UPSTREAM_GRID = NeRFConfig().grid_config()
HASH_GRID = dataclasses.replace(UPSTREAM_GRID, gridtype="hash")


def encoder_backends(device, config):
    names = ["torch"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton on the CPU, to check this script
    if (device.type == "cuda" or interpreted) and triton_available():
        names.append("triton")
    if device.type == "cuda" and tcnn_available() and config.gridtype == "hash":
        names.append("tcnn")
    return names


def bench_encoder(device, n_points, warmup, repeats):
    """Return rows {grid, backend, forward/s, fwd+bwd/s, errors vs torch} for both grid types."""
    rows = []
    for config in (UPSTREAM_GRID, HASH_GRID):
        levels = grid_levels(config)
        generator = torch.Generator(device).manual_seed(0)
        table = (torch.rand(levels.offsets[-1], config.level_dim, device=device, generator=generator) - 0.5)
        points = torch.rand(n_points, 3, device=device, generator=generator)
        grad_out = torch.randn(n_points, levels.output_dim, device=device, generator=generator)
        reference = None
        for backend in encoder_backends(device, config):
            weights = table.clone().requires_grad_()

            def forward():
                with torch.no_grad():
                    return grid_encode(points, weights, levels, backend)

            def forward_backward():
                out = grid_encode(points, weights, levels, backend)
                return out, torch.autograd.grad(out, weights, grad_out)[0]

            forward_s = median_seconds(forward, device, repeats, warmup)
            both_s = median_seconds(forward_backward, device, repeats, warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out, grad = forward_backward()
            row = {
                "grid": config.gridtype,
                "backend": backend,
                "points": n_points,
                "forward_points_per_s": n_points / forward_s,
                "fwd_bwd_points_per_s": n_points / both_s,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
            if reference is None:
                reference = (out, grad)
            else:
                row["output_rel_err"] = relative_error(out, reference[0])
                row["grad_table_rel_err"] = relative_error(grad, reference[1])
            rows.append(row)
    return rows


def camera_rays(device, size):
    """Rays (size·size, 3) of a camera 6 units from the origin looking at it (all inside upstream's box)."""
    eye = torch.tensor([4.0, -4.0, 2.0], device=device)
    forward = -eye / eye.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], device=device))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    pixels = (torch.arange(size, device=device) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(-pixels, pixels, indexing="ij")
    directions = (forward + (u[..., None] * right + v[..., None] * up) / 1.5).reshape(-1, 3)
    return eye.expand_as(directions), directions / directions.norm(dim=-1, keepdim=True)


def bench_training(device, size, warmup, repeats):
    """Return rows {backend, precision, seconds per iteration, image error vs torch float32} of one training step."""
    rays_o, rays_d = camera_rays(device, size)
    target = torch.rand(size * size, 3, device=device, generator=torch.Generator(device).manual_seed(1))
    config = NeRFRenderConfig(num_steps=64, upsample_steps=64)
    precisions = ["float32"] + (["fp16-autocast"] if device.type == "cuda" else [])
    rows, reference = [], None
    for backend in encoder_backends(device, UPSTREAM_GRID):
        for precision in precisions:
            torch.manual_seed(0)
            network = NeRFNetwork(NeRFConfig(grid_backend=backend)).to(device).train()
            optimizer = torch.optim.Adam(network.get_params(5e-4), lr=5e-4)
            generator = torch.Generator(device)

            def iteration():
                generator.manual_seed(0)
                with torch.autocast(device.type, dtype=torch.float16, enabled=precision != "float32"):
                    out = network.render(rays_o, rays_d, config, perturb=True, bg_color=0, generator=generator)
                loss = ((out["image"] - target) ** 2).mean() + (out["weights_sum"] ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                return out

            first = iteration()  # from the same initial weights for every variant: comparable images
            seconds = median_seconds(iteration, device, repeats, warmup)
            row = {"backend": backend, "precision": precision, "rays": size * size,
                   "samples_per_ray": config.num_steps + config.upsample_steps, "seconds_per_iteration": seconds,
                   "finite": bool(torch.isfinite(first["image"]).all())}
            if reference is None:
                reference = first["image"].detach()
            else:
                row["image_rel_err"] = relative_error(first["image"].detach(), reference)
            rows.append(row)
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(keys))
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        print(" | ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--points", type=int, default=None, help="points per encoder call (default 2^21, small 2^12)")
    parser.add_argument("--rays", type=int, default=None, help="image side in rays (default 128, small 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20, small 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, small 1)")
    parser.add_argument("--out", default="bench_nerf.json", help="JSON file for the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_points = args.points or (2**12 if args.small else 2**21)
    size = args.rays or (16 if args.small else 128)
    repeats = args.repeats or (2 if args.small else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if triton_available() else None,
        "encoder": bench_encoder(device, n_points, warmup, repeats),
        "training_iteration": bench_training(device, size, warmup, repeats),
    }
    print(f"device {results['device']}, torch {results['torch']}, triton {results['triton']}")
    print_table(f"grid encoder, {n_points} points", results["encoder"])
    print_table(f"training iteration, {size}x{size} rays x 128 samples", results["training_iteration"])
    errors = [row[k] for rows in (results["encoder"], results["training_iteration"]) for row in rows
              for k in row if k.endswith("_rel_err") and k != "image_rel_err"]
    if any(not math.isfinite(e) or e > 1e-5 for e in errors):
        print(f"\nWARNING: a fast path differs from the reference by more than 1e-5 relative: {errors}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

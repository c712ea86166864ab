"""Time the EFT feature cache (the distillation's preprocessing) in fp32, TF32 and mixed precision.

For one synthetic scene: Q query cameras on a circle (default 80, as the distillation caches), 2 or 3
context views of 256×256, 32×32 rays × 20 points per query. Each row is the median wall time of
`feature_cache` over repeats (after warm-up, with CUDA synchronisation), the peak GPU memory, and
the error of its features and RGB relative to the fp32 row (eval mode, so rows are deterministic).
The "upstream schedule" row renders one query at a time in 16 chunks of 64 rays, as upstream does.

    python benchmarks/bench_eft.py --out eft_bench.json                  # GPU, ~1-2 minutes
    python benchmarks/bench_eft.py --device cpu --small --out bench_eft_cpu.json  # smoke test
"""

import argparse
import json
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, load_eft
from sparsefusion.eft_render import FeatureRenderConfig, eft_mode, feature_cache, feature_rays
from sparsefusion.rays import RayBundle
from sparsefusion.relative_cameras import relative_cameras
import measures
from measures import relative_error


def circle_scene(n_views, image_size, device, seed=0):
    """Return (cameras, images): n_views cameras on a circle around the origin and smooth random images."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.linspace(0.0, 2 * math.pi, n_views + 1)[:-1]
    eye = torch.stack([8 * torch.cos(angles), torch.full_like(angles, 2.0), 8 * torch.sin(angles)], -1)
    R, T = look_at_view_transform(eye, torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))
    cameras = PerspectiveCameras(R=R, T=T, focal_length=torch.full((n_views, 2), 2.5),
                                 principal_point=torch.zeros(n_views, 2),
                                 image_size=torch.full((n_views, 2), float(image_size)))
    coarse = torch.rand(n_views, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    return cameras.to(device), images.to(device)


def set_tf32(enabled):
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def timed(fn, device, warmup, repeats):
    """Return (last result, median seconds, peak bytes allocated) of fn() over repeats after warmup."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = measures.timed(fn, device, repeats, warmup=0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return result, seconds, peak


def upstream_schedule(eft, cameras, query_index, context_index, images, near, far, config, ray_chunks=16):
    """Return (Q, C, h, w) features computed one query at a time in ray_chunks chunks, as upstream does."""
    features = []
    with torch.no_grad(), eft_mode(eft, config.mode):
        for q in query_index:
            frame = relative_cameras(cameras, q, center_at_origin=True)
            context = eft.encode(images)  # upstream encodes the context again for every query
            rays = feature_rays(frame[q], near, far, config)
            flat = [x.reshape(1, -1, x.shape[-1]) for x in (rays.origins, rays.directions, rays.lengths, rays.xys)]
            parts = [eft(RayBundle(*(x[:, index] for x in flat)), frame[context_index], context).features[0]
                     for index in torch.arange(flat[0].shape[1]).chunk(ray_chunks)]
            features.append(torch.cat(parts).reshape(config.grid_size, config.grid_size, -1).permute(2, 0, 1))
    return torch.stack(features)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test")
    parser.add_argument("--views", type=int, default=80, help="query cameras in the cache")
    parser.add_argument("--context", default="2,3", help="comma-separated numbers of context views")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=8, help="FeatureRenderConfig.views_per_chunk")
    parser.add_argument("--precisions", default="fp32,tf32,bf16,fp16")
    parser.add_argument("--ckpt", default=None, help="an EFT checkpoint (ckpt_latest_eft.pt); random weights if unset")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-upstream-schedule", action="store_true", help="skip the slow one-query-at-a-time row")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    if args.small:
        args.views, args.image_size, args.repeats, args.warmup = 3, 64, 1, 0
    device = torch.device(args.device)

    torch.manual_seed(0)
    eft = load_eft(args.ckpt) if args.ckpt else EpipolarFeatureTransformer(EFTConfig(backbone_weights="random"))
    eft = eft.to(device)
    n_context_max = max(int(c) for c in args.context.split(","))
    cameras, images = circle_scene(args.views + n_context_max, args.image_size, device)
    near, far = 8.0 - 5.0, 8.0 + 5.0  # d̄ ∓ 5 for cameras at distance ~8.2
    base = FeatureRenderConfig(image_size=args.image_size, mode="eval", views_per_chunk=args.chunk)
    rows = []
    for n_context in (int(c) for c in args.context.split(",")):
        context_index = list(range(args.views, args.views + n_context))
        query_index = list(range(args.views))
        reference = None
        for precision in args.precisions.split(","):
            set_tf32(precision == "tf32")
            config = replace(base, precision="fp32" if precision == "tf32" else precision)
            run = lambda: feature_cache(eft, cameras, context_index, images[context_index], near, far,
                                        query_index=query_index, config=config)
            cache, seconds, peak = timed(run, device, args.warmup, args.repeats)
            if reference is None:
                reference = cache
            rows.append(dict(context=n_context, precision=precision, schedule="batched", seconds=seconds,
                             ms_per_view=1e3 * seconds / args.views, peak_gib=peak / 2 ** 30,
                             features_rel_err=relative_error(cache.features, reference.features),
                             rgb_max_abs_err=(cache.eft_images - reference.eft_images).abs().max().item()))
        set_tf32(False)
        upstream_mode = replace(base, mode="upstream")
        run = lambda: feature_cache(eft, cameras, context_index, images[context_index], near, far,
                                    query_index=query_index, config=upstream_mode)
        _, seconds, peak = timed(run, device, args.warmup, args.repeats)
        rows.append(dict(context=n_context, precision="fp32", schedule="batched, upstream mode", seconds=seconds,
                         ms_per_view=1e3 * seconds / args.views, peak_gib=peak / 2 ** 30,
                         features_rel_err=float("nan"), rgb_max_abs_err=float("nan")))
        if not args.no_upstream_schedule:
            run = lambda: upstream_schedule(eft, cameras, query_index, context_index, images[context_index],
                                            near, far, base)
            features, seconds, peak = timed(run, device, 0, 1)
            rows.append(dict(context=n_context, precision="fp32", schedule="one query, 16 ray chunks (upstream)",
                             seconds=seconds, ms_per_view=1e3 * seconds / args.views, peak_gib=peak / 2 ** 30,
                             features_rel_err=relative_error(features, reference.features),
                             rgb_max_abs_err=float("nan")))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"EFT feature cache: {args.views} query views, {args.image_size}px context, {name}, torch {torch.__version__}")
    print(f"{'ctx':>3} {'precision':>9} {'schedule':<36} {'total s':>8} {'ms/view':>8} {'peak GiB':>8} "
          f"{'feat rel err':>12} {'rgb max err':>11}")
    for r in rows:
        print(f"{r['context']:>3} {r['precision']:>9} {r['schedule']:<36} {r['seconds']:>8.3f} {r['ms_per_view']:>8.2f} "
              f"{r['peak_gib']:>8.2f} {r['features_rel_err']:>12.2e} {r['rgb_max_abs_err']:>11.2e}")
    with open(args.out, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, views=args.views, image_size=args.image_size,
                       chunk=args.chunk, checkpoint=args.ckpt, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()

"""Scenes per hour and peak GPU memory with several scenes distilled at once on one GPU (demo.py --scenes_at_once).

    python benchmarks/bench_multi_scene.py --scenes_at_once 1 4 8 16 32 --out bench_multi_scene.json
    python benchmarks/bench_multi_scene.py --mini --scenes_at_once 1 4 8 16 32 --out bench_multi_scene_mini.json

Full size (default): upstream's models with random weights of the released sizes (bench_demo.py's), on
synthetic scenes of 32 views, 256² images, upstream's settings but the iteration counts. --mini: the
shipped mini models with configs/mini_demo.yaml (64² images), on freshly generated held-out scenes.

For each N, demo.py distils N scenes with --scenes_at_once N for --iterations (the first --fusion_start + 1
of them bootstrap, the rest guided) and the phases are timed (the scenes' metrics JSON). Scenes per hour
extrapolate to upstream's schedule, 1001 bootstrap and 1999 guided iterations:

    group seconds = Σ_scenes (feature cache + evaluation) + 1001·bootstrap per iteration + 1999·guided per iteration
    scenes per hour = 3600 · N / group seconds

(the mini schedule is 101 + 159 with --mini). The first guided iterations of a run include capturing the
UNet's CUDA graphs (one per padded batch size, fast_unet.PaddedBatches) or compiling it, so give enough
guided iterations for these to wash out (the defaults: 200 + 400). Peak memory is
torch.cuda.max_memory_allocated (and _reserved) over each N's run, reset before it. Needs ImageNet VGG16
weights for LPIPS (or SPARSEFUSION_VGG16), as bench_demo.py.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from benchmarks.bench_demo import full_size_checkpoints  # noqa: E402
from sparsefusion.data.synthetic import main as generate_synthetic  # noqa: E402

UPSTREAM_PHASES = (1001, 1999)  # bootstrap iterations (0 … fusion_start = 1000) and guided ones, of 3000
MINI_PHASES = (101, 159)        # configs/mini_demo.yaml: 260 iterations, fusion_start 100


def scene_flags(args, work, scenes):
    """Return the demo.py flags, but the scene count and output, of the benchmark's setting."""
    if args.mini:
        return ["--mini", "-r", str(work / "mini_data"), f"generate.scenes={scenes}", "generate.workers=8"]
    eft, vldm, vae = full_size_checkpoints(work)
    generate_synthetic(["--root", str(work / "data"), "--categories", "hydrant", "--scenes", str(scenes),
                        "--eval-scenes", str(scenes), "--workers", "8"])  # demo.py reads the evaluation scenes
    return ["-d", "synthetic", "-r", str(work / "data"), "-c", "hydrant", "-e", str(eft), "-l", str(vldm),
            "-a", str(vae)]


def measure(flags, at_once, args, out_dir):
    """Run demo.py on at_once scenes at once; return its timings, extrapolation and peak memory."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    demo.main([*flags, "-o", str(out_dir), "-i", ",".join(map(str, range(at_once))), "--scenes_at_once", str(at_once),
               "--iterations", str(args.iterations), "--fusion_start", str(args.fusion_start), "--unet", args.unet,
               *args.extra.split()])
    wall = time.perf_counter() - start
    records = [json.loads(path.read_text()) for path in sorted((out_dir / "metrics").glob("*.json"))]
    timings = [record["timings"] for record in records]
    fixed = sum(t["feature_cache_s"] + t["evaluation_s"] for t in timings)
    bootstrap = sum(t.get("bootstrap_s", 0.0) for t in timings) / (args.fusion_start + 1)  # the group's, per iteration
    guided = sum(t.get("diffusion_s", 0.0) for t in timings) / max(args.iterations - args.fusion_start - 1, 1)
    phases = MINI_PHASES if args.mini else UPSTREAM_PHASES
    group_s = fixed + phases[0] * bootstrap + phases[1] * guided
    return {"scenes_at_once": at_once, "scenes": len(records), "wall_s": wall, "fixed_s_per_scene": fixed / at_once,
            "bootstrap_iteration_s": bootstrap, "guided_iteration_s": guided,
            "extrapolated_group_s": group_s, "scenes_per_hour": 3600 * at_once / group_s,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes_at_once", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--mini", action="store_true", help="the shipped mini models and configs/mini_demo.yaml")
    parser.add_argument("--iterations", type=int, default=600, help="iterations per run (default: 600)")
    parser.add_argument("--fusion_start", type=int, default=200, help="guided from the iteration after this one")
    parser.add_argument("--unet", default="graph", choices=("eager", "compile", "graph"))
    parser.add_argument("--extra", default="", help="further demo.py flags, space-separated")
    parser.add_argument("--out", required=True, help="JSON file for the results; demo outputs go beside it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    flags = scene_flags(args, work, max(args.scenes_at_once))
    results = []
    for at_once in args.scenes_at_once:
        results.append(measure(flags, at_once, args, Path(args.out).with_suffix("") / f"at_once_{at_once}"))
        print(json.dumps(results[-1]), flush=True)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "mini": args.mini, "iterations": args.iterations,
               "fusion_start": args.fusion_start, "unet": args.unet, "extra": args.extra, "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"{'at once':>8} {'scenes/h':>9} {'guided it/s':>12} {'peak GiB':>9}")
    for r in results:
        memory = "n/a" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.1f}"
        print(f"{r['scenes_at_once']:>8} {r['scenes_per_hour']:>9.1f} {1 / r['guided_iteration_s']:>12.2f} {memory:>9}")


if __name__ == "__main__":
    main()

"""The mini models' quality table (docs/mini.md): held-out scenes × input-view counts × seeds, methods (a)–(e).

For each category, input-view count and seed it runs `demo.py --mini` twice over the scenes: the
method with baselines=true (rows (a) EFT images, (b) VLDM samples, (c) distilled NeRF, (e) nearest
input view) and --method inputs_only (row (d)). Every number is a mean over the non-input views of
a scene, then over the scenes; the table gives the mean over seeds ± their standard deviation.
Runs go `--jobs` at a time (separate processes; on one GPU they overlap, best under CUDA MPS, which
benchmarks/gpu_mini_quality.sh starts), scenes_at_once=N distils each run's scenes N at once, and a
rerun skips the scenes whose metrics exist, so the table can be filled over several calls.

    python benchmarks/mini_quality.py --out output/mini_quality --jobs 16 scenes_at_once=10   # the docs' table
    python benchmarks/mini_quality.py --out output/q_k4 --methods sparsefusion --views 2 --jobs 16 scenes_at_once=10 \
        baselines=false distill.views_per_step=4 distill.iterations=65 distill.fusion_start=25   # row (c) only
    python benchmarks/mini_quality.py --out /tmp/q --categories hydrant --scenes 1 --views 2 --seeds 0 \
        distill.iterations=20 distill.fusion_start=10                                  # a smoke run
Writes {out}/quality.json and {out}/quality.md; each run's demo outputs under {out}/runs/.
"""

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np

from sparsefusion.outputs import write_json, write_text

ROWS = (("eft", "(a) EFT images"), ("vldm", "(b) VLDM samples (PLMS from noise, EFT-conditioned)"),
        ("sparsefusion", "(c) distilled NeRF (the method)"),
        ("inputs_only", "(d) NeRF fit to the input views alone"), ("nearest_input", "(e) nearest input view"))
METRICS = ("psnr", "ssim", "lpips")
METHODS = ("sparsefusion", "inputs_only")  # the demo's methods each run: (c) with the baselines, and (d)
# what the table's run commands leave out: the mesh, and GIF frames beyond a few (the metrics don't need them)
LEAN = ("mesh_resolution=32", "distill.turntable_frames=2")


def run_dir(out, method, views, seed, category):
    return Path(out) / "runs" / f"{method}_v{views}_s{seed}" / category


def missing_scenes(directory, category, scenes, views):
    """Return the scene indices of 0..scenes-1 whose metrics file is not in directory yet."""
    return [i for i in range(scenes) if not (directory / "metrics" / f"{category}_{i:03d}_c{views}.json").is_file()]


def demo_command(directory, method, views, seed, category, indices, overrides):
    return [sys.executable, "demo.py", "--mini", "-c", category, "-v", str(views), "--seed", str(seed),
            "-i", ",".join(map(str, indices)), "--method", method, "-o", str(directory),
            *(["baselines=true"] if method == "sparsefusion" else []), *LEAN, *overrides]


def write_eval_scenes(categories, workers):
    """Write the held-out scenes demo.py --mini would write, once, before the runs start side by side."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from demo import config_from_args, generate_missing_data, parse_args

    arguments = ["--mini", "-c", ",".join(categories), f"generate.workers={workers}"]
    generate_missing_data(config_from_args(parse_args(arguments)))


def run_all(args):
    """Run every missing (method, views, seed, category) demo, args.jobs at a time; return failures."""
    write_eval_scenes(args.categories, args.jobs)
    jobs = []  # seeds outermost: a call that stops early leaves whole seeds of every view count
    for seed, views, method, category in product(args.seeds, args.views, args.methods, args.categories):
        directory = run_dir(args.out, method, views, seed, category)
        todo = missing_scenes(directory, category, args.scenes, views)
        if todo:
            jobs.append((directory, demo_command(directory, method, views, seed, category, todo, args.overrides)))
    print(f"{len(jobs)} runs to do, {args.jobs} at a time", flush=True)
    start = time.time()

    def run(job):
        directory, command = job
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "demo.log", "a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        print(f"{time.time() - start:6.0f} s  {directory.parent.name}/{directory.name}: exit {code}", flush=True)
        return code

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(run, jobs))
    return [job[0] for job, code in zip(jobs, codes) if code != 0]


def scene_values(out, method, views, seed, category, scenes):
    """Yield (row, metric, value) of a run directory's metrics files: each scene's novel-view means."""
    for index in range(scenes):
        path = run_dir(out, method, views, seed, category) / "metrics" / f"{category}_{index:03d}_c{views}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        rows = {method: record["novel_views"]}
        rows.update({name: baseline["novel_views"] for name, baseline in record.get("baselines", {}).items()})
        for row, means in rows.items():
            yield from ((row, metric, means[metric]) for metric in METRICS if means[metric] is not None)


def table(args):
    """Return {views: {row: {metric: {'mean', 'std', 'seeds', 'scenes'}}}}: over seeds, of means over scenes.

    'scenes' lists each seed's scene count: a table filled over several calls may not have them all yet.
    """
    pooled = defaultdict(list)  # (views, row, metric, seed) -> values of every scene of every category
    for views, seed, method, category in product(args.views, args.seeds, args.methods, args.categories):
        for row, metric, value in scene_values(args.out, method, views, seed, category, args.scenes):
            pooled[views, row, metric, seed].append(value)
    per_seed, scenes = defaultdict(list), defaultdict(list)  # (views, row, metric) -> one entry per seed
    for (views, row, metric, _), values in pooled.items():
        per_seed[views, row, metric].append(float(np.mean(values)))
        scenes[views, row, metric].append(len(values))
    result = {}
    for (views, row, metric), means in per_seed.items():
        result.setdefault(views, {}).setdefault(row, {})[metric] = {
            "mean": float(np.mean(means)), "std": float(np.std(means)), "seeds": len(means),
            "scenes": scenes[views, row, metric]}
    return result


def markdown(result):
    lines = []
    for views, rows in result.items():
        lines += [f"**{views} input views**", "", "| | PSNR ↑ | SSIM ↑ | LPIPS ↓ | scenes per seed |",
                  "|---|---|---|---|---|"]
        for row, title in ROWS:
            if row in rows:
                cells = [f"{rows[row][m]['mean']:.{2 if m == 'psnr' else 3}f} ± {rows[row][m]['std']:.{2 if m == 'psnr' else 3}f}"
                         if m in rows[row] else "n/a" for m in METRICS]
                counts = ", ".join(map(str, next(iter(rows[row].values()))["scenes"]))
                lines.append(f"| {title} | " + " | ".join(cells) + f" | {counts} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="output/mini_quality")
    parser.add_argument("--categories", nargs="+", default=["hydrant", "teddybear", "suitcase", "vase"])
    parser.add_argument("--scenes", type=int, default=10, help="held-out scenes 0..N-1 of each category")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 3], help="input-view counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="demo methods to run: sparsefusion gives rows (a), (b), (c), (e); inputs_only (d)")
    parser.add_argument("--jobs", type=int, default=1, help="demo processes at a time")
    parser.add_argument("--table_only", action="store_true", help="only summarise the runs that exist")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig fields for every run")
    args = parser.parse_intermixed_args()  # key=value settings may come before and after the options
    failed = [] if args.table_only else run_all(args)
    result = table(args)
    write_json({"categories": args.categories, "methods": args.methods, "scenes": args.scenes, "seeds": args.seeds,
                "overrides": args.overrides, "views": result}, Path(args.out) / "quality.json")
    write_text(markdown(result), Path(args.out) / "quality.md")
    print(markdown(result))
    if failed:
        print(f"{len(failed)} runs failed; their demo.log says why: " + ", ".join(map(str, failed)), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

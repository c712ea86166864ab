"""The one benchmark: where a scene's time goes, fp32 eager beside the fast paths, and the batched modes.

    python benchmarks/benchmark.py --out benchmark.json            # one GPU, full size: about 8 minutes
    python benchmarks/benchmark.py --mini --device cpu --paths eager --scenes_at_once 2 --views_per_step 2 \
        --warmup 1 --timed 2 --out benchmark_cpu.json               # the shipped mini models: checks the script

Full size (default): upstream's models with random weights of the released sizes (bench_demo.py's), one
synthetic hydrant scene of 32 views at 256², 2 input views, upstream's settings (DemoConfig's defaults).
--mini: the shipped mini models and configs/mini_demo.yaml. Random weights make the pictures
meaningless but not the times: every network has its size and every stage runs.

For each UNet path (--paths; demo.py's --unet: eager = the fp32 module, upstream's numerics, with the
NeRF steps eager too (distill.nerf_graphs=false); graph; compile), on one Distillation (demo.py's code,
not a copy):
- components: the UNet per call at batch 1 (first call, with compilation and graph capture, apart);
  the VAE's encode and decode of one 256² image; LPIPS of one pair; one NeRF step (the context step:
  render train_rays², loss, backward, Adam);
- the scene's phases: EFT feature cache (building the Distillation), a bootstrap iteration, a diffusion
  iteration, the final phase (finish_scene: renders of every view, metrics, GIFs, mesh);
- the scene time, extrapolated: cache + B·bootstrap + G·diffusion + final, B = fusion_start + 1 and
  G = iterations − B (upstream: 1001 and 1999).
The NeRF step also alone, under each of NERF_VARIANTS: eager, replayed from CUDA graphs, and graphs with
the MLP in bf16 (distill.nerf_precision).
Iterations are timed after --warmup untimed ones, the device synchronised around them. All paths draw
the same noise levels (one seed), but --timed iterations cannot hold the noise levels' mean, so the
diffusion iteration is corrected to the mean number of UNet calls of upstream's distribution (about
38): + (E[calls] − calls seen) · UNet ms per call; both numbers are in the JSON.

Batched modes, fast path (--batched_path), extrapolated the same way:
- --scenes_at_once N: N scenes in lockstep (sparsefusion/multi_scene.py); scenes per hour =
  3600·N / (N·(cache + final) + B·bootstrap_N + G·diffusion_N), and peak GPU memory; diffusion_N is
  corrected as above to the expected UNet calls of N scenes sharing them (the most any of them needs:
  about 47 for 2 scenes, 51 from 8 on) at the UNet's time at batch N;
- distill.views_per_step=K (docs/demo.md): seconds per scene with both phases divided by K, and with the
  diffusion phase alone divided by K (the guided iteration corrected at the UNet's time at batch K).
Needs ImageNet VGG16 weights for LPIPS (or SPARSEFUSION_VGG16), as demo.py.
"""

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from benchmarks.bench_demo import full_size_checkpoints  # noqa: E402
from benchmarks.bench_vldm import distillation_unet_calls  # noqa: E402
from benchmarks.measures import median_seconds, synchronize  # noqa: E402
from sparsefusion.data.synthetic import main as generate_synthetic  # noqa: E402
from sparsefusion.demo_config import with_image_size  # noqa: E402
from sparsefusion.distill import Distillation, History  # noqa: E402
from sparsefusion.models import load_models, unet_callable  # noqa: E402
from sparsefusion.multi_scene import MultiSceneDistillation  # noqa: E402
from sparsefusion.perceptual import lpips_distance  # noqa: E402
from sparsefusion.reconstruct import finish_scene, prepare_scene  # noqa: E402


class CountedCalls:
    """fn(*args), counting the calls (the UNet calls of the PLMS runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mini", action="store_true", help="the shipped mini models and configs/mini_demo.yaml")
    parser.add_argument("--paths", default="eager,graph,compile",
                        help="UNet paths (demo.py --unet), comma-separated; none: the NeRF step variants only")
    parser.add_argument("--batched_path", default="graph", help="UNet path of the batched modes")
    parser.add_argument("--scenes_at_once", type=int, nargs="*", default=[1, 4, 8, 16, 32])
    parser.add_argument("--views_per_step", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each timed run")
    parser.add_argument("--timed", type=int, default=20, help="timed iterations of each phase, one scene")
    parser.add_argument("--batched_timed", type=int, default=6, help="timed iterations of each phase, batched modes")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each component")
    parser.add_argument("--profile", action="store_true",
                        help="print the top GPU kernels of a NeRF step and of a diffusion iteration (batched path)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="demo.py settings, e.g. distill.nerf.grid_backend=torch (upstream's encoder)")
    args = parser.parse_args(argv)
    args.paths = [path for path in args.paths.split(",") if path != "none"]
    return args


def scene_flags(args, work):
    """Return demo.py's flags of the benchmark's setting (module docstring), writing what it needs under work."""
    if args.mini:
        return ["--mini", "-r", str(work / "mini_data"), "generate.scenes=1", "generate.workers=8"]
    eft, vldm, vae = full_size_checkpoints(work)
    generate_synthetic(["--root", str(work / "data"), "--categories", "hydrant", "--scenes", "1", "--eval-scenes", "1"])
    return ["-d", "synthetic", "-r", str(work / "data"), "-c", "hydrant", "-e", str(eft), "-l", str(vldm),
            "-a", str(vae)]


def setting(args, work):
    """Return (DemoConfig with the models' image size, Models with the eager UNet, one scene's prepared parts)."""
    config = demo.config_from_args(demo.parse_args([*scene_flags(args, work), "-o", str(work / "out"), *args.overrides]))
    config = replace(config, unet="eager")
    demo.generate_missing_data(config)
    device = torch.device(args.device)
    models = load_models(config.categories[0], config, device)
    config = with_image_size(config, models.image_size, models.latent_stride)
    scene = demo.open_dataset(config, config.categories[0])[0]
    return config, models, prepare_scene(scene, 0, config.input_views, config.distill, device, config.seed, None)


NERF_VARIANTS = {"eager": {"nerf_graphs": False}, "graphs": {}, "graphs_bf16": {"nerf_precision": "bf16"}}


def distillation(models, prepared, seed=0, **changes):
    """Return a Distillation of the prepared scene (prepare_scene's), its DistillConfig with changes."""
    _, inputs, distill, scene = prepared
    return Distillation(models, scene.cameras, scene.images, scene.masks, inputs, replace(distill, **changes), seed=seed)


def mean_iteration_s(stepper, iterations, warmup, device):
    """Return the mean seconds of stepper.step(i) over iterations, after stepping the first warmup of them untimed.

    The device's peak-memory counter restarts after the warm-up, whose cuDNN autotuning of new shapes
    allocates large trial workspaces.
    """
    for iteration in iterations[:warmup]:
        stepper.step(iteration)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for iteration in iterations[warmup:]:
        stepper.step(iteration)
    synchronize(device)
    return (time.perf_counter() - start) / (len(iterations) - warmup)


def guided_iteration_s(stepper, counted, guided, warmup, device, unet_ms, expected_calls):
    """Return the guided iteration's times: measured over guided after its first warmup, and corrected.

    A few iterations cannot hold the noise levels' distribution, so the mean time is corrected to the
    expected UNet calls per iteration: + (expected − seen) · unet_ms. counted: the UNet, counting its calls.
    """
    for iteration in guided[:warmup]:
        stepper.step(iteration)
    before = counted.calls
    measured = mean_iteration_s(stepper, guided[warmup:], 0, device)
    seen = (counted.calls - before) / len(guided[warmup:])
    return {"diffusion_iteration_measured_s": measured, "unet_calls_per_iteration_seen": seen,
            "unet_calls_per_iteration_expected": expected_calls,
            "diffusion_iteration_s": measured + (expected_calls - seen) * unet_ms / 1e3}


def phase_iterations(config, count):
    """Return (bootstrap iterations, guided iterations): count of each, the guided ones after fusion_start."""
    start = config.fusion_start + 1
    return list(range(min(count, start))), list(range(start, start + count))


def unet_inputs(models, device, batch=1):
    """Return random (latents (B, C, h, w), log_snr (B,), EFT features (B, Cc, h, w)) at the models' latent size."""
    c = models.vldm.config.unet
    side = models.image_size // models.latent_stride
    return (torch.randn(batch, c.channels, side, side, device=device), torch.zeros(batch, device=device),
            torch.randn(batch, c.cond_images_channels, side, side, device=device))


def unet_of(models):
    """Return the UNet callable the guidance runs: the fast path's, or the VLDM's own module (eager)."""
    return models.unet or models.vldm.unet


def counting(models):
    """Return (models whose UNet counts its calls, that CountedCalls)."""
    counted = CountedCalls(unet_of(models))
    return replace(models, unet=counted), counted


def unet_ms(models, device, batch, repeats):
    """Return the median ms of one call of the models' UNet at a batch size."""
    inputs = unet_inputs(models, device, batch)
    with torch.no_grad():
        return 1e3 * median_seconds(lambda: unet_of(models)(*inputs), device, repeats, warmup=3)


def component_ms(models, scene, device, repeats):
    """Return {unet_ms, vae_encode_ms, vae_decode_ms, lpips_ms} at batch 1 (one image of the scene)."""
    image = scene.images[:1]
    latents, log_snr, features = unet_inputs(models, device)
    unet = unet_of(models)
    with torch.no_grad():
        calls = {"unet_ms": lambda: unet(latents, log_snr, features),
                 "vae_encode_ms": lambda: models.codec.encode_images(image),
                 "vae_decode_ms": lambda: models.codec.decode_latents(latents)}
        if models.lpips is not None:
            calls["lpips_ms"] = lambda: lpips_distance(models.lpips, image, image.flip(-1))
        return {name: 1e3 * median_seconds(fn, device, repeats, warmup=3) for name, fn in calls.items()}


def context_step(run):
    """Run one context step of a Distillation: render train_rays², loss, backward, Adam."""
    run.descend(run.context_terms()["total"])


def first_unet_call_s(models, device):
    """Return the seconds of the UNet path's first batch-1 call: compilation and graph capture included."""
    inputs = unet_inputs(models, device)
    synchronize(device)
    start = time.perf_counter()
    unet_of(models)(*inputs)
    synchronize(device)
    return time.perf_counter() - start


def one_scene(config, models, prepared, path, args, work):
    """Return the one-scene breakdown of a UNet path (module docstring)."""
    device = torch.device(args.device)
    models = replace(models, unet=unet_callable(models.vldm, path, device))
    row = {"path": path, "first_unet_call_s": first_unet_call_s(models, device)}
    row.update(component_ms(models, prepared[3], device, args.repeats))
    counted_models, counted = counting(models)
    start = time.perf_counter()
    run = distillation(counted_models, prepared, **NERF_VARIANTS["eager" if path == "eager" else "graphs"])
    synchronize(device)
    row["eft_cache_s"] = time.perf_counter() - start
    row["nerf_step_ms"] = 1e3 * median_seconds(lambda: context_step(run), device, args.repeats, warmup=3)
    bootstrap, guided = phase_iterations(run.config, args.warmup + args.timed)
    row["bootstrap_iteration_s"] = mean_iteration_s(run, bootstrap, args.warmup, device)
    row.update(guided_iteration_s(run, counted, guided, args.warmup, device, row["unet_ms"],
                                  distillation_unet_calls(models.vldm.config.plms_steps)))
    if args.profile and path == args.batched_path:
        print_profile("NeRF step (context)", lambda: context_step(run), device)
        print_profile("diffusion iteration", lambda: run.step(guided[-1]), device)
    start = time.perf_counter()
    label = prepared[0]
    finish_scene(models, prepared[3], 0, label, prepared[1], run, History(), {}, work / f"final_{path}",
                 config.mesh_threshold, config.mesh_resolution, baselines=False)
    row["final_phase_s"] = time.perf_counter() - start
    row["scene_s"] = fixed_s(row) + phases_s(run.config, row)
    return row


def nerf_step_variants(models, prepared, args):
    """Return {variant: ms} of the NeRF (context) step under each of NERF_VARIANTS."""
    device = torch.device(args.device)
    times = {}
    for name, changes in NERF_VARIANTS.items():
        run = distillation(models, prepared, **changes)
        times[name] = 1e3 * median_seconds(lambda: context_step(run), device, args.repeats, warmup=3)
        print(f"NeRF step, {name}: {times[name]:.2f} ms", flush=True)
    return times


def print_profile(title, fn, device, rows=15):
    """Print the kernels taking the most device time over 3 calls of fn (after one untimed call)."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(3):
            fn()
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\nprofile: {title}, 3 calls\n" + profile.key_averages().table(sort_by=sort, row_limit=rows), flush=True)


def fixed_s(row):
    """Return a scene's seconds outside the iterations: EFT feature cache and final phase."""
    return row["eft_cache_s"] + row["final_phase_s"]


def phases_s(distill, row, scale=1, bootstrap_scale=None):
    """Return ⌈B/bootstrap_scale⌉·bootstrap + ⌈G/scale⌉·diffusion iteration seconds, B = fusion_start + 1, G = the
    rest; bootstrap_scale defaults to scale."""
    bootstrap = distill.fusion_start + 1
    guided = distill.iterations - bootstrap
    return (math.ceil(bootstrap / (bootstrap_scale or scale)) * row["bootstrap_iteration_s"]
            + math.ceil(guided / scale) * row["diffusion_iteration_s"])


def batched_models(models, args):
    """Return models with the batched modes' UNet path, padded to a few batch sizes (fast_unet.PaddedBatches)."""
    device = torch.device(args.device)
    largest = max([*args.scenes_at_once, *args.views_per_step, 1])
    return replace(models, unet=unet_callable(models.vldm, args.batched_path, device, largest))


def allocated_gib(device):
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def scenes_at_once(models, prepared, fixed, args):
    """Return a row per N of --scenes_at_once: iteration times, scenes per hour and peak GPU memory.

    The largest N's Distillations are built once and the first N of them stepped for each N. The memory of N
    is the peak over the timed diffusion iterations less the share of the built scenes not stepped.
    """
    device = torch.device(args.device)
    before = allocated_gib(device)
    counted_models, counted = counting(models)  # one Models: scenes at once must share their guidance's models
    runs = [distillation(counted_models, prepared, seed=seed) for seed in range(max(args.scenes_at_once, default=0))]
    per_scene = None if before is None else (allocated_gib(device) - before) / len(runs)
    rows = []
    for n in args.scenes_at_once:
        stepper = runs[0] if n == 1 else MultiSceneDistillation(runs[:n])
        row = {"scenes_at_once": n, **iteration_times(stepper, counted, models, n, n, args)}
        row["scenes_per_hour"] = 3600 * n / (n * fixed_s(fixed) + phases_s(runs[0].config, row))
        if per_scene is not None:
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 - (len(runs) - n) * per_scene
        rows.append(row)
        print(json.dumps(row), flush=True)
        del stepper
    return rows


def iteration_times(stepper, counted, models, scenes, batch, args):
    """Return the bootstrap and guided iteration times of a batched mode's stepper (batched_timed of each), the
    guided one corrected to the expected UNet calls of `scenes` at once at the UNet's ms at batch `batch`.

    counted: the UNet of the stepper's guidance, counting its calls.
    """
    device = torch.device(args.device)
    bootstrap, guided = phase_iterations(stepper.config, args.warmup + args.batched_timed)
    row = {"bootstrap_iteration_s": mean_iteration_s(stepper, bootstrap, args.warmup, device),
           "unet_ms": unet_ms(models, device, batch, args.repeats)}
    expected = distillation_unet_calls(models.vldm.config.plms_steps, scenes)
    row.update(guided_iteration_s(stepper, counted, guided, args.warmup, device, row["unet_ms"], expected))
    return row


def views_per_step(models, prepared, fixed, args):
    """Return a row per K of --views_per_step: iteration times and the scene's seconds with both phases divided by K
    (scene_s) and with the diffusion phase alone divided by K (scene_diffusion_divided_s)."""
    rows = []
    counted_models, counted = counting(models)
    for k in args.views_per_step:
        run = distillation(counted_models, prepared, views_per_step=k)
        row = {"views_per_step": k, **iteration_times(run, counted, models, 1, k, args)}
        row["scene_s"] = fixed_s(fixed) + phases_s(run.config, row, scale=k)
        row["scene_diffusion_divided_s"] = fixed_s(fixed) + phases_s(run.config, row, scale=k, bootstrap_scale=1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


BREAKDOWN = (("first UNet call (compile, capture), s", "first_unet_call_s"), ("UNet call, batch 1, ms", "unet_ms"),
             ("VAE encode, ms", "vae_encode_ms"), ("VAE decode, ms", "vae_decode_ms"), ("LPIPS, ms", "lpips_ms"),
             ("NeRF step (context), ms", "nerf_step_ms"), ("EFT feature cache, s", "eft_cache_s"),
             ("bootstrap iteration, s", "bootstrap_iteration_s"),
             ("diffusion iteration (measured), s", "diffusion_iteration_measured_s"),
             ("UNet calls per diffusion iteration (seen)", "unet_calls_per_iteration_seen"),
             ("diffusion iteration (mean calls), s", "diffusion_iteration_s"),
             ("final phase, s", "final_phase_s"), ("one scene, extrapolated, s", "scene_s"))


def print_summary(results):
    rows = results["one_scene"]
    print(f"\n{results['device']}, torch {results['torch']}; {results['setting']}")
    print(f"{'':44s}" + "".join(f"{row['path']:>12s}" for row in rows))
    for title, key in BREAKDOWN:
        print(f"{title:44s}" + "".join(f"{row.get(key, float('nan')):12.4g}" for row in rows))
    for row in results["scenes_at_once"]:
        memory = f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else ""
        print(f"{row['scenes_at_once']:3d} scenes at once: {row['scenes_per_hour']:.1f} scenes/hour{memory}")
    print("NeRF step, ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in results["nerf_step_ms"].items()))
    for row in results["views_per_step"]:
        k = row["views_per_step"]
        print(f"{k:3d} views per step: phases / {k}: {row['scene_s']:.1f} s/scene; diffusion phase / {k}: "
              f"{row['scene_diffusion_divided_s']:.1f} s/scene")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as demo.py
    work = Path(tempfile.mkdtemp())
    config, models, prepared = setting(args, work)
    rows = [one_scene(config, models, prepared, path, args, work) for path in args.paths]
    for row in rows:
        print(json.dumps(row), flush=True)
    fast = next((row for row in rows if row["path"] == args.batched_path), rows[-1] if rows else None)
    models = batched_models(models, args)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "python": platform.python_version(),
               "setting": "mini models" if args.mini else "upstream's sizes, random weights",
               "overrides": args.overrides,
               "image_size": config.image_size, "iterations": config.distill.iterations,
               "fusion_start": config.distill.fusion_start, "warmup": args.warmup, "timed": args.timed,
               "batched_timed": args.batched_timed, "batched_path": args.batched_path, "one_scene": rows,
               "nerf_step_ms": nerf_step_variants(models, prepared, args),
               "scenes_at_once": scenes_at_once(models, prepared, fast, args) if fast else [],
               "views_per_step": views_per_step(models, prepared, fast, args) if fast else []}
    print_summary(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Time train.py's step at upstream's sizes on one GPU: fp32 against TF32 and bf16 autocast, with loss parity.

    python benchmarks/bench_train.py --out bench_train.json                    # one GPU, full size
    python benchmarks/bench_train.py --config configs/mini_train.yaml --out bench_train_mini.json  # the mini models

One step is everything train.py does per iteration after loading a scene: draw the query and 2–5
context views, render the EFT's 32×32 features with gradients, encode the query with the VAE, the
VLDM loss on 12 copies, the colour loss, backward, both Adam steps and StepLR steps. Models are
upstream's full EFT (16.8 M), VLDM (400.7 M) and SD VAE (83.7 M) with random weights (the UNet's
final_conv randomised too: it starts at zero); the scene is a synthetic 256×256 one. Every variant
starts from the same weights and the same random state, so they see the same draws; "rel err"
compares the first step's losses (before any update) with fp32's. Times are medians over --steps steps after --warmup steps, with CUDA events; steps/s is
1000 / median ms. Data loading is not included (train.py overlaps it in worker processes).
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsefusion.data.synthetic import render_synthetic_scene  # noqa: E402
from sparsefusion.joint_objective import JointObjective, adam_with_step_lr  # noqa: E402
from sparsefusion.trainer import train_step  # noqa: E402
from sparsefusion.precision import set_matmul_precision  # noqa: E402
from sparsefusion.training import PRECISIONS, load_config  # noqa: E402
from measures import call_ms, relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", help="a TrainConfig YAML, e.g. configs/mini_train.yaml (default: upstream's sizes)")
    parser.add_argument("--variants", default=",".join(PRECISIONS), help=f"comma-separated from {', '.join(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = [name for name in args.variants if name not in PRECISIONS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(PRECISIONS)}")
    return args


def measure(name, objective, initial, scene, config, args, device):
    """Return one row of results: first-step losses, median step time and peak memory of a precision."""
    config = copy.copy(config)
    config.precision = name
    objective.config = config
    set_matmul_precision(name)
    objective.model.load_state_dict(initial)
    pairs = [adam_with_step_lr(module, config) for module in (objective.vldm, objective.eft)]
    objective.optimizers, objective.schedulers = [p[0] for p in pairs], [p[1] for p in pairs]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)

    def step():
        return train_step(objective.model, objective, objective.batch(scene), name, device)

    start = time.perf_counter()
    first = {key: value.item() for key, value in step().items()}
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    times = [call_ms(step, device) for _ in range(args.steps)]
    row = {"variant": name, "first_step_s": first_step_s, "step_ms": statistics.median(times),
           "step_ms_min": min(times), "step_ms_max": max(times), "losses": first}
    row["steps_per_s"] = 1e3 / row["step_ms"]
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    set_matmul_precision("fp32")
    return row


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as train.py
    overrides = ["category=hydrant", "vae=random", "eft.backbone_weights=random"]
    config = load_config(args.config, overrides + ["stage=joint"])
    torch.manual_seed(args.seed)
    scene = render_synthetic_scene("hydrant", args.seed, n_views=config.views_per_scene,
                                   image_hw=(config.image_size,) * 2, supersample=1).to_scene()
    objective = JointObjective(config, device)
    objective.vldm.unet.final_conv.reset_parameters()  # zero-initialised otherwise: ε̂ = 0 in every precision
    initial = copy.deepcopy(objective.model.state_dict())
    sizes = {name: sum(p.numel() for p in module.parameters()) / 1e6
             for name, module in (("eft", objective.eft), ("vldm", objective.vldm), ("vae", objective.codec.vae))}
    print(f"{args.config or 'full-size'} models on {device}: "
          + ", ".join(f"{name} {millions:.1f} M" for name, millions in sizes.items())
          + f"; {config.image_size}² images, {config.queries_per_step} queries x diffusion batch "
          + f"{config.diffusion_batch_size}")

    rows = []
    for name in args.variants:
        try:
            rows.append(measure(name, objective, initial, scene, config, args, device))
        except Exception as err:  # one variant failing (e.g. out of memory) must not hide the others
            rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"})
        print(f"  done: {name}", flush=True)

    reference = next((row for row in rows if row["variant"] == "fp32" and "error" not in row), None)
    print(f"\n{'variant':8s} {'step ms':>9s} {'steps/s':>8s} {'x fp32':>7s} {'peak GB':>8s} "
          f"{'loss':>9s} {'diff rel err':>12s} {'color rel err':>13s} {'1st step s':>10s}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:8s} failed: {row['error']}")
            continue
        if reference is not None:
            row["speedup"] = reference["step_ms"] / row["step_ms"]
            for part in ("diffusion", "color"):
                row[f"{part}_rel_err"] = relative_error(row["losses"][part], reference["losses"][part])
        print(f"{row['variant']:8s} {row['step_ms']:9.1f} {row['steps_per_s']:8.2f} {row.get('speedup', 1.0):7.2f} "
              f"{row.get('peak_mem_gb', 0.0):8.2f} {row['losses']['total']:9.5f} "
              f"{row.get('diffusion_rel_err', 0.0):12.2e} {row.get('color_rel_err', 0.0):13.2e} "
              f"{row['first_step_s']:10.1f}")

    if args.out:
        summary = {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "config": args.config, "queries_per_step": config.queries_per_step, "params_millions": sizes, "image_size": config.image_size,
            "diffusion_batch_size": config.diffusion_batch_size, "steps": args.steps, "warmup": args.warmup,
            "results": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

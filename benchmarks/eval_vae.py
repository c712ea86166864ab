"""Reconstruction quality of a VAE on held-out scenes: PSNR, SSIM and LPIPS of decode(encode(image)).

Each scene's images go through the LatentCodec as the distillation uses it (posterior mode × scale
factor, then decode), so the numbers are those of what diffusion targets can look like at best.
Writes {out}.json (per category and overall means) and {out}.png (each category's first scene's
first images above their reconstructions).

    python benchmarks/eval_vae.py --vae checkpoints/mini/vae.pt --root data/mini/eval \
        --categories hydrant teddybear suitcase vase --out output/mini/vae_heldout
"""

import argparse
from pathlib import Path

import torch

from sparsefusion.data.co3d import CO3DConfig, CO3DDataset
from sparsefusion.errors import exit_on_user_error
from sparsefusion.metrics import frame_means, scene_metrics
from sparsefusion.outputs import image_grid, write_image, write_json
from sparsefusion.perceptual import build_lpips
from sparsefusion.vae import load_latent_codec

PICTURE_IMAGES = 6  # images of each category in the picture


def evaluate(args):
    device = torch.device(args.device)
    codec = load_latent_codec(args.vae, device=device)
    lpips_model = build_lpips("vgg", device=device)
    per_category, panels = {}, []
    for category in args.categories:
        dataset = CO3DDataset(CO3DConfig(root=args.root, category=category, image_size=args.image_size,
                                         sample_batch_size=args.views))
        frames = []
        for index in range(min(args.scenes, len(dataset))):
            images = dataset[index].images
            recon = codec.reconstruct(images.to(device)).cpu()
            frames += scene_metrics(recon, images, lpips_model)["frames"]
            if index == 0:
                panels += [image.permute(1, 2, 0).numpy() for image in images[:PICTURE_IMAGES]]
                panels += [image.permute(1, 2, 0).numpy() for image in recon[:PICTURE_IMAGES]]
        per_category[category] = {**frame_means(frames), "images": len(frames)}
        print(category, {k: round(v, 4) for k, v in per_category[category].items() if v is not None})
    overall = {metric: sum(c[metric] for c in per_category.values()) / len(per_category)
               for metric in ("psnr", "ssim") + (("lpips",) if lpips_model is not None else ())}
    write_json({"vae": args.vae, "root": args.root, "scenes_per_category": args.scenes, "views": args.views,
                "categories": per_category, "mean": overall}, Path(f"{args.out}.json"))
    write_image(image_grid(panels, per_row=PICTURE_IMAGES), Path(f"{args.out}.png"))
    print("mean", {k: round(v, 4) for k, v in overall.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True, help="VAE file (a shipped vae.pt or a training ckpt_latest_vae.pt)")
    parser.add_argument("--root", default="data/mini/eval", help="held-out synthetic scenes")
    parser.add_argument("--categories", nargs="+", default=["hydrant"])
    parser.add_argument("--scenes", type=int, default=4, help="scenes per category")
    parser.add_argument("--views", type=int, default=8, help="images per scene (evenly spaced)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="output/vae_heldout", help="output prefix: {out}.json and {out}.png")
    evaluate(parser.parse_args())


if __name__ == "__main__":
    with exit_on_user_error():
        main()

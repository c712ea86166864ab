"""Does a custom scene look like CO3D to the models? EFT novel-view quality of one scene read every way.

    python benchmarks/bench_custom.py --out bench_custom.json      # the mini models of checkpoints/mini, CPU

One held-out synthetic scene (the mini quick start's first: seed 1, 84×112, 32 views) is read
through the CO3D reader, as CO3D-style annotations of a custom folder, as nerfstudio's
transforms.json with masks, the same in a world scaled by 0.037, rotated and shifted (as a COLMAP
reconstruction's arbitrary unit and origin), that one without normalisation, and without masks.
For each, the EFT renders every camera from the same two input views; the table gives PSNR / SSIM
over the other views. Equal numbers mean the cameras reach the models as CO3D's would.
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparsefusion.data import load_dataset
from sparsefusion.data.custom import read_co3d_views
from sparsefusion.data.synthetic import generate_dataset
from sparsefusion.demo_config import load_demo_config, with_image_size
from sparsefusion.distill import Distillation
from sparsefusion.metrics import frame_means, scene_metrics
from sparsefusion.models import load_models
from sparsefusion.reconstruct import input_views, novel_views


def write_transforms(views, folder, masks=True, scale=1.0, rotation=None, offset=None):
    """Write views (from CO3D-style annotations) as transforms.json + images/ (+ masks/), the world changed by
    X' = scale · rotation X + offset."""
    rotation = torch.eye(3, dtype=torch.float64) if rotation is None else rotation
    offset = torch.zeros(3, dtype=torch.float64) if offset is None else offset
    frames = []
    for view in views:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(view.image_path, folder / "images" / view.image_path.name)
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            shutil.copy(view.mask_path, folder / "masks" / view.mask_path.name)
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, :3] = rotation @ view.R_cv.T @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
        c2w[:3, 3] = scale * (rotation @ (-view.R_cv.T @ view.t_cv)) + offset
        (fx, fy), (cx, cy) = view.focal_px.tolist(), view.principal_px.tolist()
        frames.append({"file_path": f"images/{view.image_path.name}", "transform_matrix": c2w.tolist(),
                       "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": view.image_hw[1], "h": view.image_hw[0]})
    (folder / "transforms.json").write_text(json.dumps({"frames": frames}))
    return folder


def eft_quality(models, config, scene):
    """Return (novel-view means {'psnr', 'ssim'}, (near, far)) of the EFT's images from scene 0's two input views."""
    inputs = input_views(len(scene), 0, 2, 0)
    with torch.no_grad():
        distillation = Distillation(models, scene.cameras, scene.images, scene.masks, inputs, config.distill)
    metrics = scene_metrics(distillation.cache.eft_images[:len(scene)].clamp(0, 1), scene.images, None)
    novel = frame_means([metrics["frames"][view] for view in novel_views(scene, inputs)])
    return novel, (float(distillation.near), float(distillation.far))


def main():
    """Write the variants, measure each, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="checkpoints/mini", help="folder of eft.pt, vldm.pt, vae.pt")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    torch.manual_seed(0)
    m = args.models
    config = load_demo_config("configs/mini_demo.yaml", [f"eft={m}/eft.pt", f"vldm={m}/vldm.pt", f"vae={m}/vae.pt"])
    models = load_models("hydrant", config, torch.device("cpu"))
    config = with_image_size(config, models.image_size, models.latent_stride)
    angle = 0.7
    rotation = torch.tensor([[math.cos(angle), 0, -math.sin(angle)], [0, 1, 0], [math.sin(angle), 0, math.cos(angle)]],
                            dtype=torch.float64)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "synth", ["hydrant"], scenes=1, frames=32, seed=1, image_sizes=[(84, 112)],
                         eval_scenes=1, show_progress=False)
        category = tmp / "synth" / "hydrant"
        views = read_co3d_views(category / "frame_annotations.jgz", category)
        scaled = write_transforms(views, tmp / "scaled", scale=0.037, rotation=rotation,
                                  offset=torch.tensor([3.0, -5.0, 20.0], dtype=torch.float64))
        variants = {
            "CO3D reader": ("synthetic", tmp / "synth", {}),
            "custom: CO3D-style annotations": ("custom", category, {}),
            "custom: transforms.json": ("custom", write_transforms(views, tmp / "plain"), {}),
            "custom: world x0.037, rotated, shifted": ("custom", scaled, {}),
            "the same, normalize=none": ("custom", scaled, {"normalize": "none"}),
            "custom: transforms.json, no masks": ("custom", write_transforms(views, tmp / "bare", masks=False), {}),
        }
        for label, (name, root, options) in variants.items():
            start = time.perf_counter()
            scene = load_dataset(name, root, "hydrant", image_size=models.image_size, **options)[0]
            novel, depths = eft_quality(models, config, scene)
            results.append({"variant": label, "psnr": novel["psnr"], "ssim": novel["ssim"], "depth_range": depths,
                            "has_masks": scene.has_masks, "seconds": time.perf_counter() - start})
            print(f"{label:42s} PSNR {novel['psnr']:6.2f}  SSIM {novel['ssim']:.3f}  "
                  f"depths {depths[0]:5.1f}..{depths[1]:5.1f}", flush=True)
    Path(args.out).write_text(json.dumps({"models": m, "results": results}, indent=2))


if __name__ == "__main__":
    main()

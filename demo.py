"""Reconstruct scenes by distilling SparseFusion's view-conditioned diffusion into a NeRF, per scene.

    python demo.py -d co3d_toy -c hydrant                 # scene 0 of the toy set, 2 input views
    python demo.py -d co3d_toy -c hydrant -i 0,5,7 -v 3   # scenes 0, 5 and 7 from 3 input views
    python demo.py -d synthetic -c hydrant -i 0,1 -g 2    # two GPUs, one scene each

Outputs go to output/demo/ (see sparsefusion/reconstruct.py for the files).
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from external.nerf_renderer import RenderConfig as NeRFRenderConfig
from sparsefusion.data import CO3D_ALL_CATEGORIES, CO3D_ALL_TEN, DATASET_NAMES, load_dataset
from sparsefusion.distill import DistillConfig
from sparsefusion.distributed import check_gpu_count, launch, split_list
from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.models import check_checkpoints, load_models
from sparsefusion.outputs import write_json
from sparsefusion.evaluation import mean_over_scenes
from sparsefusion.reconstruct import reconstruct_scene, summary_line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-g", "--gpus", type=int, default=1, help="number of GPUs (processes) to use (default: 1)")
    parser.add_argument("-p", "--port", type=int, default=1, help="last digit of the DDP port 1234p (default: 1)")
    parser.add_argument("-d", "--dataset_name", default="co3d_toy", choices=DATASET_NAMES, help="dataset (default: co3d_toy)")
    parser.add_argument("-r", "--root", help="dataset root (default: data/{dataset_name})")
    parser.add_argument("-c", "--category", required=True, help="CO3D category, 'all_ten' or 'all'")
    parser.add_argument("-v", "--input_views", type=int, default=2, help="number of random input views (default: 2)")
    parser.add_argument("-i", "--idx", default="0", help="scene indices to evaluate, e.g. 0,5,7 (default: 0)")
    parser.add_argument("-e", "--eft", help="EFT checkpoint (default: checkpoints/sf/{category}/ckpt_latest_eft.pt)")
    parser.add_argument("-l", "--vldm", help="VLDM checkpoint (default: checkpoints/sf/{category}/ckpt_latest.pt)")
    parser.add_argument("-a", "--vae", help="Stable Diffusion VAE checkpoint (default: checkpoints/sd/sd-v1-3-vae.ckpt)")
    parser.add_argument("-o", "--output", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--iterations", type=int, default=DistillConfig.iterations, help="distillation iterations per scene (default: 3000)")
    parser.add_argument("--fusion_start", type=int, default=DistillConfig.fusion_start, help="diffusion distillation after this iteration (default: 1000)")
    parser.add_argument("--train_rays", type=int, default=DistillConfig.train_rays, help="NeRF renders train_rays² rays while fitting (default: 128)")
    parser.add_argument("--image_size", type=int, default=DistillConfig.image_size, help="image size of the models (default: 256; smaller only for small models)")
    parser.add_argument("--circle_cameras", type=int, default=DistillConfig.circle_cameras, help="extra circle cameras (default: 50)")
    parser.add_argument("--turntable_frames", type=int, default=DistillConfig.turntable_frames, help="frames of the turntable GIF (default: 50)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 autocast of the EFT feature cache and the eager UNet/LPIPS calls on CUDA; the VAE stays fp32 (default: fp32)")
    parser.add_argument("--eft_mode", default="upstream", choices=("upstream", "eval"), help="EFT BatchNorm batch statistics + dropout as upstream, or eval mode")
    parser.add_argument("--unet", default="graph", choices=("eager", "graph", "compile"),
                        help="UNet on CUDA: 'eager' fp32 as upstream; 'graph' bf16 + CUDA graph, 4x faster (default); "
                             "'compile' adds torch.compile, 7x")
    parser.add_argument("--vgg_weights", help="ImageNet VGG16 weights for LPIPS when the torch hub cache has none")
    parser.add_argument("--num_steps", type=int, default=NeRFRenderConfig.num_steps, help="stratified samples per NeRF ray (default: 64)")
    parser.add_argument("--upsample_steps", type=int, default=NeRFRenderConfig.upsample_steps, help="importance samples per NeRF ray (default: 64)")
    parser.add_argument("--mesh_threshold", type=float, default=10.0, help="density threshold of the exported mesh (default: 10)")
    parser.add_argument("--mesh_resolution", type=int, default=256, help="marching-cubes grid size of the mesh (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="input views are a permutation seeded by seed + scene index (default: 0)")
    return parser.parse_args(argv)


def parse_indices(text):
    """Return the scene indices of -i, e.g. '0,5,7' -> [0, 5, 7]."""
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"-i/--idx {text!r} is invalid; use comma-separated scene indices such as 0,5,7") from None
    if any(i < 0 for i in indices):
        raise UserError(f"-i/--idx {text!r} has a negative index; scene indices start at 0")
    return indices


def categories(name):
    """Return the categories named by -c: one category, 'all_ten' or 'all'."""
    if name == "all_ten":
        return list(CO3D_ALL_TEN)
    if name == "all":
        return list(CO3D_ALL_CATEGORIES)
    return [name]


def distill_config(args):
    config = DistillConfig(iterations=args.iterations, fusion_start=args.fusion_start, train_rays=args.train_rays,
                           image_size=args.image_size, circle_cameras=args.circle_cameras,
                           turntable_frames=args.turntable_frames, precision=args.precision,
                           perceptual_start=min(DistillConfig.perceptual_start, args.fusion_start))
    config.features = replace(config.features, image_size=args.image_size, mode=args.eft_mode, precision=args.precision)
    config.nerf_render = replace(config.nerf_render, num_steps=args.num_steps, upsample_steps=args.upsample_steps)
    return config


def check_args(args):
    """Raise UserError for flags that cannot work, before any process is spawned."""
    check_gpu_count(args.gpus)
    if args.input_views < 1:
        raise UserError(f"-v/--input_views must be at least 1, got {args.input_views}")
    if args.iterations < 1:
        raise UserError(f"--iterations must be at least 1, got {args.iterations}")
    if args.train_rays < 1 or args.image_size % args.train_rays:
        raise UserError(f"--train_rays {args.train_rays} must divide --image_size {args.image_size}")
    if args.image_size % 8:
        raise UserError(f"--image_size must be a multiple of 8 (the VAE's and EFT's stride), got {args.image_size}")
    parse_indices(args.idx)
    if args.category not in ("all_ten", "all") and args.dataset_name != "synthetic" and args.category not in CO3D_ALL_CATEGORIES:
        raise UserError(f"unknown category {args.category!r}; use one of CO3D's: {', '.join(CO3D_ALL_CATEGORIES)}, 'all_ten' or 'all'")


def open_dataset(args, category):
    options = {} if args.dataset_name == "co3d_toy" else {"image_size": args.image_size}
    return load_dataset(args.dataset_name, args.root or f"data/{args.dataset_name}", category, **options)


def preflight(args):
    """Raise UserError for a missing dataset or checkpoint, an index out of range or too many input views."""
    indices = parse_indices(args.idx)
    for category in categories(args.category):
        dataset = open_dataset(args, category)
        if max(indices) >= len(dataset):
            raise UserError(f"-i/--idx {max(indices)} is out of range: {category} has {len(dataset)} scenes "
                            f"(0..{len(dataset) - 1})")
        n_views = len(dataset[indices[0]].images)
        if args.input_views > n_views:
            raise UserError(f"-v/--input_views {args.input_views} is more than the {n_views} views of "
                            f"{category} scene {indices[0]}")
        check_checkpoints(category, args)


def run_category(rank, args, category, config, out_dir):
    """Reconstruct this rank's share of the requested scenes of one category; return their records."""
    dataset = open_dataset(args, category)
    models = load_models(category, args, rank.device)
    records = []
    for scene_index in split_list(parse_indices(args.idx), rank.world_size)[rank.rank]:
        record = reconstruct_scene(
            models, dataset[scene_index], scene_index, args.input_views, config, out_dir, rank.device,
            seed=args.seed, mesh_threshold=args.mesh_threshold, mesh_resolution=args.mesh_resolution,
            progress_factory=lambda total, label: tqdm(total=total, desc=label, position=rank.local_rank,
                                                       dynamic_ncols=True, disable=None))
        tqdm.write(summary_line(record))
        records.append(record)
    return records


def worker(rank, args):
    with exit_on_user_error():
        if rank.device.type == "cpu" and rank.is_main:
            print("warning: no GPU, running on the CPU: hours per scene at full size "
                  "(see --iterations, --train_rays, --num_steps)", file=sys.stderr)
        out_dir = Path(args.output)
        config = distill_config(args)
        records = []
        for category in categories(args.category):
            records += run_category(rank, args, category, config, out_dir)
        gathered = gather_records(records, rank)
        if rank.is_main:
            path = out_dir / "summary.json"
            write_json({"scenes": gathered, "mean": mean_over_scenes(gathered) if gathered else None}, path)
            print(f"{len(gathered)} scene(s) done; summary in {path}")


def gather_records(records, rank):
    """Return every rank's scene records on rank 0 (its own elsewhere)."""
    if rank.world_size == 1:
        return records
    everyone = [None] * rank.world_size
    torch.distributed.all_gather_object(everyone, [{k: v for k, v in r.items() if k != "frames"} for r in records])
    return [record for part in everyone for record in part]


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        check_args(args)
        preflight(args)
        launch(worker, args.gpus, args.port, args=(args,))


if __name__ == "__main__":
    sys.exit(main())

"""Reconstruct scenes by distilling SparseFusion's view-conditioned diffusion into a NeRF, per scene.

    python demo.py --mini                                 # quick start: the shipped mini models on a synthetic scene
    python demo.py -d co3d_toy -c hydrant                 # scene 0 of the toy set, 2 input views
    python demo.py -d co3d_toy -c hydrant -i 0,5,7 -v 3   # scenes 0, 5 and 7 from 3 input views
    python demo.py -d synthetic -c hydrant -i 0,1 -g 2    # two GPUs, one scene each
    python demo.py --mini distill.iterations=600 idx=3    # any DemoConfig field as key=value
    python demo.py -d custom -r my_scene -c hydrant --input_names IMG_01,IMG_07   # your own scene (docs/data.md)

Settings, lowest priority first: DemoConfig's defaults (upstream's demo), the --config YAML (--mini
is configs/mini_demo.yaml), the flags, then key=value overrides. Outputs go to output/demo/ (see
sparsefusion/reconstruct.py for the files).
"""

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from sparsefusion.errors import UserError, exit_on_user_error

MINI_CONFIG = Path(__file__).resolve().parent / "configs" / "mini_demo.yaml"

# flag -> DemoConfig field; upstream's short flags and our long ones
FLAG_FIELDS = {
    "gpus": "gpus", "port": "port", "dataset_name": "dataset_name", "root": "root", "category": "category",
    "input_views": "input_views", "idx": "idx", "eft": "eft", "vldm": "vldm", "vae": "vae", "output": "output",
    "input_names": "input_names", "input_index": "input_index",
    "seed": "seed", "skip_done": "skip_done", "image_size": "image_size", "precision": "precision", "eft_mode": "eft_mode", "unet": "unet",
    "vgg_weights": "vgg_weights", "mesh_threshold": "mesh_threshold", "mesh_resolution": "mesh_resolution",
    "method": "distill.method", "iterations": "distill.iterations", "fusion_start": "distill.fusion_start",
    "train_rays": "distill.train_rays", "circle_cameras": "distill.circle_cameras",
    "turntable_frames": "distill.turntable_frames", "num_steps": "distill.nerf_render.num_steps",
    "upsample_steps": "distill.nerf_render.upsample_steps", "scenes_at_once": "scenes_at_once",
}


def parse_args(argv=None):
    from sparsefusion.config import field_help
    from sparsefusion.demo_config import DemoConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="every DemoConfig field (key=value), with its default:\n"
                                            + "\n".join(field_help(DemoConfig)))
    add = parser.add_argument
    add("-g", "--gpus", type=int, help="number of GPUs (processes) to use (default: 1)")
    add("-p", "--port", type=int, help="last digit of the DDP port 1234p (default: 1)")
    add("-d", "--dataset_name", help="dataset: co3d, co3d_toy, synthetic, or custom: your own scene folder "
                                     "(default: co3d_toy)")
    add("-r", "--root", help="dataset root, or the scene folder of -d custom (default: data/{dataset_name})")
    add("-c", "--category", help="CO3D category, comma-separated categories, 'all_ten' or 'all' (required)")
    add("-v", "--input_views", type=int, help="number of random input views (default: 2)")
    add("--input_names", help="the input views by image name (path, file name or stem), comma-separated; overrides -v")
    add("--input_index", help="the input views by index into the scene's views, comma-separated; overrides -v")
    add("-i", "--idx", help="scene indices to evaluate, e.g. 0,5,7 (default: 0)")
    add("-e", "--eft", help="EFT checkpoint (default: checkpoints/sf/{category}/ckpt_latest_eft.pt)")
    add("-l", "--vldm", help="VLDM checkpoint (default: checkpoints/sf/{category}/ckpt_latest.pt)")
    add("-a", "--vae", help="VAE checkpoint (default: checkpoints/sd/sd-v1-3-vae.ckpt)")
    add("-o", "--output", help="output folder (default: output/demo)")
    add("--config", help="YAML file of DemoConfig fields")
    add("--mini", action="store_true", help=f"the quick start: --config {MINI_CONFIG.relative_to(MINI_CONFIG.parents[1])} "
                                            "(mini models, synthetic scenes generated when missing)")
    add("--method", help="sparsefusion, or inputs_only: a NeRF fit to the input views alone (default: sparsefusion)")
    add("--iterations", type=int, help="distillation iterations per scene (default: 3000)")
    add("--fusion_start", type=int, help="diffusion distillation after this iteration (default: 1000)")
    add("--train_rays", type=int, help="NeRF renders train_rays² rays while fitting (default: 128)")
    add("--image_size", type=int, help="check that the models work at this size (default: 0, the models' size)")
    add("--circle_cameras", type=int, help="extra circle cameras (default: 50)")
    add("--turntable_frames", type=int, help="frames of the turntable GIF (default: 50)")
    add("--precision", help="fp32, or bf16 autocast of the EFT feature cache and the eager UNet; the VAE and LPIPS "
                            "stay fp32 (default: fp32)")
    add("--eft_mode", help="upstream: EFT BatchNorm batch statistics + dropout as upstream; eval: neither")
    add("--unet", help="UNet on CUDA: 'eager' fp32 as upstream; 'graph' bf16 + CUDA graph, 4x faster (default); "
                       "'compile' adds torch.compile, 7x")
    add("--vgg_weights", help="ImageNet VGG16 weights for LPIPS when the torch hub cache has none")
    add("--num_steps", type=int, help="stratified samples per NeRF ray (default: 64)")
    add("--upsample_steps", type=int, help="importance samples per NeRF ray (default: 64)")
    add("--mesh_threshold", type=float, help="density threshold of the exported mesh (default: 10)")
    add("--mesh_resolution", type=int, help="marching-cubes grid size of the mesh (default: 256)")
    add("--scenes_at_once", type=int, help="distill this many scenes at once on each GPU, batching their models' calls "
                                           "(default: 1; docs/demo.md)")
    add("--seed", type=int, help="every random draw of scene i (input views, NeRF, noise) follows from seed + i "
                               "(default: 0)")
    add("--skip_done", action="store_true", default=None,
        help="skip scenes whose outputs an earlier run completed (their metrics JSON exists)")
    add("overrides", nargs="*", metavar="key=value", help="DemoConfig fields, e.g. distill.iterations=500")
    return parser.parse_args(argv)


def config_from_args(args):
    """Return the DemoConfig of parsed arguments."""
    from sparsefusion.demo_config import load_demo_config

    if args.mini and args.config:
        raise UserError("--mini is --config configs/mini_demo.yaml: pass one of them")
    flags = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    return load_demo_config(MINI_CONFIG if args.mini else args.config, args.overrides, **flags)


def open_dataset(config, category):
    """Return the dataset of one category that config names (co3d_toy's files are cut already: no sizes apply)."""
    from sparsefusion.data import load_dataset

    options = {"image_size": config.image_size or 256, "resize_mode": config.resize_mode}
    if config.dataset_name == "custom":  # the named input views stay among the scene's views
        options.update(asdict(config.custom), include=tuple(config.chosen_inputs[0]))
    return load_dataset(config.dataset_name, config.dataset_root, category, **options)


def generate_missing_data(config):
    """Write the synthetic categories the config asks for that are missing, as config.generate says."""
    from sparsefusion.data.synthetic import generate_dataset, parse_image_size

    recipe = config.generate
    if config.dataset_name != "synthetic" or recipe.scenes < 1:
        return
    root = Path(config.dataset_root)
    missing = [c for c in config.categories if not (root / c / "frame_annotations.jgz").is_file()]
    if missing:
        print(f"writing {recipe.scenes} synthetic evaluation scenes of {', '.join(missing)} under {root} "
              f"(seed {recipe.seed}; once)", file=sys.stderr)
        generate_dataset(root, missing, recipe.scenes, recipe.frames, recipe.seed,
                         [parse_image_size(size) for size in recipe.image_sizes], eval_scenes=recipe.scenes,
                         workers=recipe.workers)


def preflight(config):
    """Raise one UserError listing every problem found before any work: the data of every requested scene, the
    checkpoints (their contents too when -g N > 1 would otherwise find them in N processes), the output folder."""
    from sparsefusion.atomic_files import writable_folder_problems
    from sparsefusion.demo_config import parse_indices, with_image_size
    from sparsefusion.errors import problems_of, raise_problems
    from sparsefusion.models import checkpoint_problems, load_checkpoints

    problems, view_counts = [], []
    for category in config.categories:
        problems += checkpoint_problems(category, config)
        try:
            dataset = open_dataset(config, category)
        except UserError as err:
            problems += str(err).splitlines()
            continue
        found, counts = scene_problems(config, category, dataset, parse_indices(config.idx))
        problems += found
        view_counts += counts
    if not problems and config.gpus > 1:
        problems += problems_of(*[lambda category=category: with_image_size(
            config, *models_size(load_checkpoints(category, config, "cpu"))) for category in config.categories])
    problems += writable_folder_problems(config.output, output_bytes(config, view_counts), "output folder -o")
    raise_problems(problems)


def models_size(models):
    """Return (image size, latent stride) of Models: what with_image_size checks the config against."""
    return models.image_size, models.latent_stride


def scene_problems(config, category, dataset, indices):
    """Return (one line per problem with the requested scenes of a category, the view counts of the good ones).

    Every scene in range is loaded: its files, masks and cameras are read now, not after earlier scenes ran.
    """
    from sparsefusion.cameras import unusable_cameras
    from sparsefusion.reconstruct import chosen_input_views

    outside = [index for index in indices if index >= len(dataset)]
    problems = [f"-i/--idx {','.join(map(str, outside))} is out of range: {category} has {len(dataset)} scenes "
                f"(0..{len(dataset) - 1})"] if outside else []
    view_counts = []
    for index in (index for index in indices if index < len(dataset)):
        try:
            scene = dataset[index]
            chosen = chosen_input_views(scene, *config.chosen_inputs)
        except UserError as err:
            problems += [f"{category} scene {index}: {line}" for line in str(err).splitlines()]
            continue
        n_views = len(scene.images)
        if chosen is None and config.input_views > n_views:
            problems.append(f"-v/--input_views {config.input_views} is more than the {n_views} views of "
                            f"{category} scene {index}; e.g. -v {min(2, n_views)}")
        n_cached = n_views + config.distill.circle_cameras
        if config.distill.views_per_step > n_cached:
            problems.append(f"distill.views_per_step {config.distill.views_per_step} is more than the {n_cached} "
                            f"cached cameras of {category} scene {index} ({n_views} views + distill.circle_cameras); "
                            f"e.g. distill.views_per_step={n_cached}")
        problems += [f"{category} scene {index} ({scene.sequence_name}): {what} (views {views}); fix its annotations"
                     for what, views in unusable_cameras(scene.cameras).items()]
        if not bool(scene.images.isfinite().all()):
            problems.append(f"{category} scene {index} ({scene.sequence_name}): its images hold NaN or infinite values")
        view_counts.append(n_views)
    return problems, view_counts


def output_bytes(config, view_counts):
    """Return about the bytes the outputs of scenes of view_counts views take: NeRF files, frames and GIFs, meshes."""
    import torch

    from sparsefusion.external.nerf_network import NeRFNetwork

    with torch.device("meta"):
        nerf_values = sum(parameter.numel() for parameter in NeRFNetwork(config.distill.nerf).parameters())
    side = config.image_size or 256  # the models' size is known once they are loaded; upstream's is 256
    per_scene = 4 * nerf_values + 64 * config.mesh_resolution ** 2
    return len(view_counts) * per_scene + 8 * 3 * side * side * sum(view_counts)


def scene_label(config, category, scene_index):
    """Return the output name of a scene, as reconstruct_scene will name it."""
    from sparsefusion.reconstruct import sequence_label

    names, index = config.chosen_inputs
    return sequence_label(category, scene_index, len(names or index) or config.input_views)


def run_category(rank, config, category, out_dir):
    """Reconstruct this rank's share of the requested scenes of one category; return their records.

    With skip_done, a scene whose metrics JSON (written last) exists is not computed again: its record is read.
    """
    from tqdm import tqdm

    from sparsefusion.demo_config import parse_indices, with_image_size
    from sparsefusion.distributed import split_list
    from sparsefusion.models import load_models
    from sparsefusion.progress import progress_bar
    from sparsefusion.reconstruct import (chosen_input_views, reconstruct_scene, reconstruct_scenes, record_path,
                                          summary_line)
    from sparsefusion.report import update_run_page

    mine = split_list(parse_indices(config.idx), rank.world_size)[rank.rank]
    done = {index: record_path(out_dir, scene_label(config, category, index)) for index in mine}
    done = {index: path for index, path in done.items() if config.skip_done and path.is_file()}
    records = []
    for index, path in done.items():
        records.append(json.loads(path.read_text()))
        tqdm.write(f"{path.stem}: done by an earlier run, skipped (skip_done)")
    if len(done) == len(mine):
        return records
    models = load_models(category, config, rank.device)
    if rank.device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True  # the loop's shapes are fixed: each convolution is autotuned once
    config = with_image_size(config, models.image_size, models.latent_stride)
    if rank.device.type == "cpu" and rank.is_main and config.image_size >= 128:
        print("warning: no GPU, running on the CPU: hours per scene at full size "
              "(see --iterations, --train_rays, --num_steps)", file=sys.stderr)
    dataset = open_dataset(config, category)
    todo = [index for index in mine if index not in done]
    options = dict(seed=config.seed, mesh_threshold=config.mesh_threshold, mesh_resolution=config.mesh_resolution,
                   baselines=config.baselines,
                   progress_factory=lambda total, label: progress_bar(total, label, position=rank.local_rank))
    for start in range(0, len(todo), config.scenes_at_once):
        indices = todo[start:start + config.scenes_at_once]
        scenes = [dataset[index] for index in indices]
        inputs = [chosen_input_views(scene, *config.chosen_inputs) for scene in scenes]
        if config.scenes_at_once == 1:
            done_now = [reconstruct_scene(models, scenes[0], indices[0], config.input_views, config.distill, out_dir,
                                          rank.device, inputs=inputs[0], **options)]
        else:
            done_now = reconstruct_scenes(models, scenes, indices, config.input_views, config.distill, out_dir,
                                          rank.device, inputs=inputs, **options)
        for record in done_now:
            tqdm.write(summary_line(record))
        records += done_now
        if rank.is_main:
            update_run_page(out_dir, running=True)
    return records


def worker(rank, config):
    """Reconstruct this rank's scenes of every category; rank 0 writes summary.json and the run page."""
    from sparsefusion.evaluation import mean_over_scenes
    from sparsefusion.outputs import write_json
    from sparsefusion.report import update_run_page

    out_dir = Path(config.output)
    records = []
    for category in config.categories:
        records += run_category(rank, config, category, out_dir)
    gathered = gather_records(records, rank)
    if rank.is_main:
        path = out_dir / "summary.json"
        write_json({"scenes": gathered, "mean": mean_over_scenes(gathered) if gathered else None}, path)
        update_run_page(out_dir)
        print(f"{len(gathered)} scene(s) done; summary in {path}")


def gather_records(records, rank):
    """Return every rank's scene records on rank 0 (its own elsewhere)."""
    import torch

    if rank.world_size == 1:
        return records
    everyone = [None] * rank.world_size
    torch.distributed.all_gather_object(everyone, [{k: v for k, v in r.items() if k != "frames"} for r in records])
    return [record for part in everyone for record in part]


def main(argv=None):
    args = parse_args(argv)
    config = None
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM as on Ctrl-C
    with exit_on_user_error():
        try:
            from sparsefusion.atomic_files import remove_stale_temporaries
            from sparsefusion.distributed import check_gpu_count, launch

            config = config_from_args(args)
            check_gpu_count(config.gpus)
            generate_missing_data(config)
            preflight(config)
            remove_stale_temporaries(config.output)
            launch(worker, config.gpus, config.port, args=(config,))
        except KeyboardInterrupt:
            where = config.output if config else "the output folder"
            print(f"interrupted: the scenes finished so far are in {where}; rerun with skip_done=true to go on "
                  f"from there", file=sys.stderr)
            return 130
        finally:
            signal.signal(signal.SIGTERM, sigterm)


if __name__ == "__main__":
    sys.exit(main())

"""Reconstruct one scene: choose input views, distill, render, score and write upstream's outputs.

Files under the output folder, for scene sequence name {seq} = {category}_{index:03d}_c{views}:
  log/{seq}_inputs.jpg          the input views, side by side
  log/{seq}_eft_grid.jpg        EFT images of the scene's cameras, 8 per row
  log/{seq}_loss.jpg            the context steps' loss terms per iteration; log/{seq}_fusionloss.jpg the
                                fusion steps' (bootstrap, diffusion, opacity), if any
  log/{seq}_vis.jpg             the latest preview of the last circle camera: render | silhouette
  render_imgs/{seq}/NNN.jpg     ground truth | ours, per scene camera
  render_gifs/{seq}.gif         ground truth | EFT | ours | ground-truth mask | our mask
  render_gifs/{seq}_circle.gif  turntable: ours | our mask
  metrics/{seq}.txt             upstream's mean PSNR / SSIM / LPIPS
  metrics/{seq}.json            the same per frame, plus input views, timings and the configuration;
                                written last: a scene with this file is complete (demo.py skip_done=true)
  meshes/{seq}.ply              marching-cubes mesh of the NeRF (beyond upstream)
  {seq}.pt                      the NeRF, {'model_state_dict': …}
"""

import sys
import time
from dataclasses import asdict, replace

import torch

from sparsefusion.checkpoint import save_atomic
from sparsefusion.distill import Distillation, run_distillation
from sparsefusion.errors import UserError
from sparsefusion.mesh import NoSurface, export_mesh
from sparsefusion.multi_scene import MultiSceneDistillation, run_multi_scene
from sparsefusion.baselines import baseline_metrics
from sparsefusion.data.views import view_indices_by_name
from sparsefusion.metrics import frame_means, scene_metrics
from sparsefusion.outputs import image_grid, plot_losses, side_by_side, write_gif, write_image, write_json, write_text

CONTEXT_TERMS = ("volumetric", "color", "silhouette", "opacity")  # Distillation.step's terms, per plot
FUSION_TERMS = ("fusion", "bootstrap_color", "bootstrap_silhouette", "diffusion_l1", "diffusion_perceptual",
                "fusion_opacity")


def input_views(n_views, scene_index, count, seed=0):
    """Return the input view indices of a scene: the first count of a permutation seeded by seed + scene_index."""
    generator = torch.Generator().manual_seed(seed + scene_index)
    return torch.randperm(n_views, generator=generator)[:count].tolist()


def chosen_input_views(scene, names=(), index=()):
    """Return the input view indices a user chose by image names or by view indices, or None for neither.

    names match a view's image name, file name or stem (Scene.frame_names); UserError for an unknown
    name, an index out of range, or a view chosen twice.
    """
    if names:
        if scene.frame_names is None:
            raise UserError("input_names needs views with names (-d custom); this scene's views have none: "
                            "use input_index")
        chosen = view_indices_by_name(scene.frame_names, names, f"scene {scene.sequence_name}")
    elif index:
        chosen = list(index)
        if max(chosen) >= len(scene.images):
            raise UserError(f"input_index {','.join(map(str, chosen))} is out of range: scene {scene.sequence_name} "
                            f"has {len(scene.images)} views (0..{len(scene.images) - 1})")
    else:
        return None
    if len(set(chosen)) != len(chosen):
        raise UserError(f"the input views {','.join(map(str, names or index))} choose a view twice")
    return chosen


def novel_views(scene, inputs):
    """Return the indices of the scene's views that show no input frame.

    A scene of fewer frames than views repeats frames (upstream's linspace choice); a repeat of an
    input frame is not a novel view.
    """
    input_frames = {int(scene.frame_numbers[view]) for view in inputs}
    return [view for view in range(len(scene.images)) if int(scene.frame_numbers[view]) not in input_frames]


def sequence_label(category, scene_index, n_inputs):
    """Return upstream's output name of a scene, e.g. hydrant_005_c2."""
    return f"{category}_{scene_index:03d}_c{n_inputs}"


def hwc(images):
    """Return (N, 3|1, H, W) tensors as a list of (H, W, C) numpy arrays."""
    return list(images.detach().float().cpu().permute(0, 2, 3, 1).numpy())


def write_preview(out_dir, label, distillation):
    """Write log/{label}_vis.jpg: the NeRF's render | silhouette of the last augmented circle camera, labelled."""
    images, silhouettes = distillation.render(distillation.cameras.augmented[-1:])
    write_image(side_by_side(hwc(images) + hwc(silhouettes), labels=("render", "silhouette")),
                out_dir / "log" / f"{label}_vis.jpg")


def check_finite_nerf(distillation, label, iteration):
    """Raise UserError if the NeRF's weights hold a NaN or an infinity (a diverged loss); one device sync."""
    if not torch.stack([parameter.isfinite().all() for parameter in distillation.nerf.parameters()]).all():
        raise UserError(f"{label}: the NeRF diverged (weights NaN or infinite by iteration {iteration}), so the scene "
                        f"has no metrics; check its cameras and images, or lower distill.lr")


def write_scene_outputs(out_dir, label, scene, distillation, history, renders, metrics, extra):
    """Write the per-scene files listed in this module's docstring but the mesh and the metrics JSON; return the
    JSON record."""
    n_views = len(scene.images)
    images, silhouettes = renders
    eft_images = distillation.cache.eft_images[:n_views]
    write_image(image_grid(hwc(eft_images), per_row=8), out_dir / "log" / f"{label}_eft_grid.jpg")
    plot_losses(history.curves(CONTEXT_TERMS), out_dir / "log" / f"{label}_loss.jpg",
                title=f"{label}: context views")
    fusion_curves = history.curves(FUSION_TERMS)
    if fusion_curves:  # method 'inputs_only' has no fusion step
        plot_losses(fusion_curves, out_dir / "log" / f"{label}_fusionloss.jpg", title=f"{label}: fusion steps")

    gt, ours, eft = hwc(scene.images), hwc(images), hwc(eft_images)
    gt_masks, our_masks = hwc(scene.masks), hwc(silhouettes)
    write_image(side_by_side([gt[i] for i in extra["input_views"]]), out_dir / "log" / f"{label}_inputs.jpg")
    for i in range(n_views):
        write_image(side_by_side([gt[i], ours[i]]), out_dir / "render_imgs" / label / f"{i:03d}.jpg")
    write_gif([side_by_side([gt[i], eft[i], ours[i], gt_masks[i], our_masks[i]]) for i in range(n_views)],
              out_dir / "render_gifs" / f"{label}.gif")
    turn_images, turn_silhouettes = distillation.render(distillation.cameras.turntable)
    write_gif([side_by_side([a, b]) for a, b in zip(hwc(turn_images), hwc(turn_silhouettes))],
              out_dir / "render_gifs" / f"{label}_circle.gif")

    lpips_text = "n/a" if metrics["lpips"] is None else str(metrics["lpips"])
    write_text("warning: this metric is used for debugging only and not the final metric\n"
               f"psnr:\n{metrics['psnr']}\nssim:\n{metrics['ssim']}\nlpips:\n{lpips_text}\n",
               out_dir / "metrics" / f"{label}.txt")
    save_atomic({"model_state_dict": distillation.nerf.state_dict()}, out_dir / f"{label}.pt")
    return {"sequence": label, **extra, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "lpips": metrics["lpips"], "frames": metrics["frames"], "config": asdict(distillation.config)}


def record_path(out_dir, label):
    """Return the metrics JSON of a scene: written last, so its presence means the scene's outputs are complete."""
    return out_dir / "metrics" / f"{label}.json"


def reconstruct_scene(models, scene, scene_index, n_inputs, config, out_dir, device, seed=0,
                      mesh_threshold=10.0, mesh_resolution=256, progress_factory=None, baselines=False, inputs=None):
    """Distill one scene and write its outputs; return its JSON record (metrics, inputs, timings).

    The record's psnr/ssim/lpips are upstream's means over every camera; 'novel_views' holds the means
    over the cameras that show no input frame (novel_views()), and with baselines=True 'baselines' holds the metrics
    of the EFT images, VLDM samples and nearest input views (sparsefusion/baselines.py) on those.

    Args:
        scene: a data.Scene (images (N, 3, S, S), masks, cameras). Without masks (scene.has_masks
            False) the silhouette terms are off: config.silhouette_weight = 0.
        progress_factory: callable(total, description) -> tqdm-like bar, or None.
        inputs: the input view indices; None = the first n_inputs of a permutation seeded by seed + scene_index.
        seed: with scene_index, the seed of every random draw (Distillation's seed is seed + scene_index).
    """
    label, inputs, config, scene = prepare_scene(scene, scene_index, n_inputs, config, device, seed, inputs)
    start = time.perf_counter()
    distillation = Distillation(models, scene.cameras, scene.images, scene.masks, inputs, config,
                                seed=seed + scene_index)
    timings = {"feature_cache_s": time.perf_counter() - start}

    bar = progress_factory(config.iterations, label) if progress_factory else None

    def on_log(iteration, distillation):
        check_finite_nerf(distillation, label, iteration)
        write_preview(out_dir, label, distillation)

    history, phases = run_distillation(distillation, progress=bar, on_log=on_log)
    timings.update(phases)
    if bar is not None:
        bar.close()
    return finish_scene(models, scene, scene_index, label, inputs, distillation, history, timings, out_dir,
                        mesh_threshold, mesh_resolution, baselines)


def reconstruct_scenes(models, scenes, scene_indices, n_inputs, config, out_dir, device, seed=0,
                       mesh_threshold=10.0, mesh_resolution=256, progress_factory=None, baselines=False, inputs=None):
    """Distill several scenes at once (sparsefusion/multi_scene.py) and write each one's outputs; return their records.

    Each scene's files and record are reconstruct_scene's, its numbers those of reconstruct_scene up to
    floating-point differences; the record adds 'scenes_at_once', and its 'bootstrap_s' and 'diffusion_s'
    are the group's times divided among its scenes. One progress bar covers the group.

    Args:
        scenes, scene_indices: the scenes (data.Scene) and their indices; inputs: None, or per scene its
            input view indices (None for the seeded choice); the rest as reconstruct_scene's.
    """
    inputs = [None] * len(scenes) if inputs is None else inputs
    prepared = [prepare_scene(scene, index, n_inputs, config, device, seed, chosen)
                for scene, index, chosen in zip(scenes, scene_indices, inputs)]
    runs, timings = [], []
    for (label, chosen, scene_config, scene), index in zip(prepared, scene_indices):
        start = time.perf_counter()
        runs.append(Distillation(models, scene.cameras, scene.images, scene.masks, chosen, scene_config,
                                 seed=seed + index))
        timings.append({"feature_cache_s": time.perf_counter() - start})
    labels = [label for label, _, _, _ in prepared]
    bar = progress_factory(config.iterations, f"{labels[0]}…{labels[-1]} ({len(labels)} at once)") \
        if progress_factory else None

    def on_log(iteration, index, distillation):
        check_finite_nerf(distillation, labels[index], iteration)
        write_preview(out_dir, labels[index], distillation)

    histories, phases = run_multi_scene(MultiSceneDistillation(runs), progress=bar, on_log=on_log)
    if bar is not None:
        bar.close()
    records = []
    for (label, chosen, _, scene), index, run, history, own in zip(prepared, scene_indices, runs, histories, timings):
        own.update({phase: seconds / len(runs) for phase, seconds in phases.items()})
        records.append(finish_scene(models, scene, index, label, chosen, run, history, own, out_dir, mesh_threshold,
                                    mesh_resolution, baselines, scenes_at_once=len(runs)))
    return records


def prepare_scene(scene, scene_index, n_inputs, config, device, seed, inputs):
    """Return (label, input view indices, the scene's DistillConfig, the scene on device) of a scene to distill."""
    n_inputs = n_inputs if inputs is None else len(inputs)
    label = sequence_label(scene.category, scene_index, n_inputs)
    inputs = input_views(len(scene.images), scene_index, n_inputs, seed) if inputs is None else list(inputs)
    if not scene.has_masks and config.silhouette_weight:
        print(f"warning: {label}: no foreground masks, so the silhouette terms are off and quality is lower; "
              f"docs/data.md ('Masks') says how to make them", file=sys.stderr)
        config = replace(config, silhouette_weight=0.0)
    return label, inputs, config, scene.to(device)


def finish_scene(models, scene, scene_index, label, inputs, distillation, history, timings, out_dir, mesh_threshold,
                 mesh_resolution, baselines, **extra):
    """Render and score a distilled scene, write its outputs (the JSON last) and return its record (plus extra)."""
    config = distillation.config
    start = time.perf_counter()
    renders = distillation.render(distillation.cameras.scene)
    metrics = scene_metrics(renders[0].cpu(), scene.images.cpu(), models.lpips)
    novel = novel_views(scene, inputs)
    extra = {"category": scene.category, "scene_index": scene_index, "source_sequence": scene.sequence_name,
             "method": config.method, "input_views": inputs, "n_views": len(scene.images),
             "novel_views": frame_means([metrics["frames"][view] for view in novel]), **extra}
    if baselines:
        extra["baselines"] = baseline_metrics(distillation, scene.images, novel, models.lpips,
                                              distillation.device_generator)
    timings["evaluation_s"] = time.perf_counter() - start
    extra["timings"] = timings
    record = write_scene_outputs(out_dir, label, scene, distillation, history, renders, metrics, extra)
    try:
        export_mesh(distillation.nerf, out_dir / "meshes" / f"{label}.ply", bound=config.nerf.bound,
                    threshold=mesh_threshold, resolution=mesh_resolution)
    except NoSurface as err:  # the mesh is an extra: a scene's other outputs stand without it
        print(f"warning: {label}: no mesh written: {err} with --mesh_threshold", file=sys.stderr)
    write_json(record, record_path(out_dir, label))
    return record


def summary_line(record):
    """Return one line summarising a scene's record."""
    lpips = "n/a" if record["lpips"] is None else f"{record['lpips']:.3f}"
    seconds = sum(record["timings"].values())
    novel = record["novel_views"]
    novel_lpips = "n/a" if novel["lpips"] is None else f"{novel['lpips']:.3f}"
    return (f"{record['sequence']}: PSNR {record['psnr']:.2f}  SSIM {record['ssim']:.3f}  LPIPS {lpips}  "
            f"(novel views {novel['psnr']:.2f} / {novel['ssim']:.3f} / {novel_lpips})  "
            f"inputs {record['input_views']}  {seconds:.0f} s")


"""A synthetic dataset in CO3Dv2's on-disk format: procedural objects filmed like phone captures.

Each scene is one object made of ellipsoids, capped cylinders and boxes (a 'hydrant', a
'teddybear', ...) with procedural textures, standing on a textured floor in front of a gradient
backdrop. It is rendered by analytic ray casting through our PerspectiveCameras (rays from
sparsefusion.rays), supersampled so that image and mask edges are soft, on non-square images.
The cameras circle the object on a tilted, wobbling orbit with hand-shake in aim and roll, a
zooming focal length and a drifting principal point; the whole scene sits in a random world frame
(rotation plus a small offset), as CO3D's per-sequence reconstructions do.

Everything follows from the seed. `python -m sparsefusion.data.synthetic --root data/synthetic`
writes {root}/{category}/... exactly as CO3Dv2 lays it out (see co3d.py), which co3d.CO3DDataset
then reads like the real thing. render_synthetic_scene makes one scene in memory, for tests.
"""

import argparse
import gzip
import json
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparsefusion.atomic_files import remove_stale_temporaries, write_bytes
from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform
from sparsefusion.data.co3d import INTRINSICS_FORMATS, pixels_to_viewpoint
from sparsefusion.data.crop import ndc_to_pixel_intrinsics, valid_region_box
from sparsefusion.data.scene import Scene
from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.data.shapes import (CATEGORY_BUILDERS, HIT_EPS, SYNTHETIC_CATEGORIES, SyntheticObject, hit_object,
                                      make_object, object_surface_points, rotation, safe_divisor)
from sparsefusion.rays import ndc_grid_xy, rays_from_xy


# ---------------------------------------------------------------------------------------------
# Cameras: a hand-held orbit
# ---------------------------------------------------------------------------------------------

def random_rotation(generator):
    """Return a uniformly random (3, 3) rotation matrix (det +1)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.linalg.det(q)


def phone_orbit(n_views, object_radius, image_hw, generator):
    """Return canonical-frame cameras (n_views) circling an object of object_radius at the origin.

    Azimuth sweeps 80-100 % of a turn at an uneven pace; elevation, distance, zoom and principal
    point wobble smoothly; the orbit plane is tilted; aim and roll shake a little. The distance
    keeps the object inside the image (projected radius below 0.8 of the shorter half-side).
    """
    s = torch.arange(n_views, dtype=torch.float64) / n_views  # capture progress in [0, 1)

    def u(low, high):
        return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64)

    def wobble(amplitude, cycles):
        return amplitude * torch.sin(2 * math.pi * cycles * s + u(0, 2 * math.pi))

    focal = u(1.8, 2.4) * (1 + wobble(0.08, u(0.5, 1.5)))
    distance = object_radius * (1 + focal.max() / 0.8) * (1.06 + wobble(0.05, u(1, 3)))
    azimuth = u(0, 2 * math.pi) + u(0.8, 1.0) * 2 * math.pi * (s + wobble(0.02, 2) / (2 * math.pi))
    elevation = u(0.2, 0.6) + wobble(0.1, u(1, 2))
    eye = distance[:, None] * torch.stack([torch.cos(elevation) * torch.cos(azimuth), torch.sin(elevation),
                                           torch.cos(elevation) * torch.sin(azimuth)], dim=-1)
    tilt = rotation(torch.randn(3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 0.0, 1.0]),
                    float(u(0.0, 0.2)))
    eye = eye @ tilt.T
    target = torch.randn(n_views, 3, generator=generator, dtype=torch.float64) * 0.04 * object_radius
    up = (tilt @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))[None]
    R, T = look_at_view_transform(eye, target, up)
    roll = torch.randn(n_views, generator=generator, dtype=torch.float64) * math.radians(3)
    spin = torch.zeros(n_views, 3, 3, dtype=torch.float64)
    spin[:, 0, 0], spin[:, 0, 1], spin[:, 1, 0], spin[:, 1, 1] = roll.cos(), roll.sin(), -roll.sin(), roll.cos()
    spin[:, 2, 2] = 1.0
    R = R @ spin
    T = (T[:, None, :] @ spin)[:, 0]
    principal = torch.stack([wobble(0.03, u(0.5, 1.5)), wobble(0.03, u(0.5, 1.5))], dim=-1)
    return PerspectiveCameras(
        R=R, T=T, focal_length=focal[:, None].expand(n_views, 2).clone(), principal_point=principal,
        image_size=torch.tensor([image_hw], dtype=torch.float64).expand(n_views, 2).clone(),
    )


def to_world(cameras, rotation_m, offset):
    """Return canonical-frame cameras re-expressed in the world frame X_world = X_canonical @ M + offset."""
    R = rotation_m.T @ cameras.R
    T = cameras.T - (offset[None, None, :] @ R)[:, 0]
    return PerspectiveCameras(R=R, T=T, focal_length=cameras.focal_length,
                              principal_point=cameras.principal_point, image_size=cameras.image_size)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def shade(albedo, normal, light, ambient=0.35):
    """Return Lambertian colours (R, 3): albedo · (ambient + (1 − ambient) · max(0, n·l))."""
    return albedo * (ambient + (1 - ambient) * (normal @ light).clamp(min=0.0)[:, None])


def render_canonical_rays(obj, o, d):
    """Return (rgb (R, 3), foreground (R,) bool) of canonical rays o + t d through the scene."""
    t_obj, normal, albedo = hit_object(obj.primitives, o, d)
    t_floor = (obj.floor_y - o[:, 1]) / safe_divisor(d[:, 1])
    floor_point = o + torch.nan_to_num(t_floor, posinf=0.0)[:, None] * d
    on_floor = (t_floor > HIT_EPS) & (floor_point[:, [0, 2]].norm(dim=-1) < 6 * obj.radius)
    t_floor = torch.where(on_floor, t_floor, torch.full_like(t_floor, math.inf))
    # the object stands on the floor and the cameras are above it: the floor never hides the object
    # (floor_y, from surface samples, may sit a hair above the object's lowest point)
    foreground = torch.isfinite(t_obj)

    height = 0.5 + 0.5 * F.normalize(d, dim=-1)[:, 1]
    colors = obj.backdrop_colors.to(o)
    rgb = colors[0] + (colors[1] - colors[0]) * height[:, None]
    tiles = torch.floor(floor_point[:, [0, 2]] * 2.5 / obj.radius).sum(-1).remainder(2)[:, None]
    floor_albedo = obj.floor_colors[0].to(o) * (1 - tiles) + obj.floor_colors[1].to(o) * tiles
    up = torch.tensor([0.0, 1.0, 0.0], dtype=o.dtype, device=o.device).expand_as(o)
    light = obj.light.to(o)
    rgb = torch.where(torch.isfinite(t_floor)[:, None], shade(floor_albedo, up, light), rgb)
    rgb = torch.where(foreground[:, None], shade(albedo.to(o.dtype), normal, light), rgb)
    return rgb.clamp(0.0, 1.0), foreground


def render_views(obj, cameras, world_rotation, world_offset, supersample=2, device="cpu"):
    """Return (images (N, 3, H, W), masks (N, 1, H, W)) in [0, 1] of world cameras (N), all one size.

    Each pixel averages supersample² rays through its sub-pixel centres, so edges are soft and the
    mask is the fraction of the pixel the object covers. The rays are traced on device (results on
    the CPU); a device's results are deterministic, other devices' differ by float rounding.
    """
    with single_thread():
        return _render_views(obj, cameras, world_rotation, world_offset, supersample, torch.device(device))


@contextmanager
def single_thread():
    """Run the block with one intra-op thread: tracing is many small element-wise ops, for which OpenMP
    start-up costs more than it gains, and far more on a machine busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _render_views(obj, cameras, world_rotation, world_offset, supersample, device):
    height, width = (int(v) for v in cameras.image_size[0])
    xy = ndc_grid_xy(width * supersample, height * supersample, dtype=torch.float64)
    origins, directions = [], []
    for i in range(len(cameras)):
        bundle = rays_from_xy(cameras[i].to(torch.float64), xy[None], 1.0, 1.0, 1)
        # float64 for the change of frame, float32 for tracing: ample for unit-size objects
        origins.append(((bundle.origins.reshape(-1, 3) - world_offset) @ world_rotation.T).float())
        directions.append((bundle.directions.reshape(-1, 3) @ world_rotation.T).float())
    # every view's rays in one trace: on a GPU, per-view traces would be bound by kernel launches
    rgb, foreground = render_canonical_rays(obj, torch.cat(origins).to(device), torch.cat(directions).to(device))
    grid = torch.cat([rgb, foreground[:, None].to(rgb.dtype)], dim=-1)
    grid = grid.reshape(len(cameras), height * supersample, width * supersample, 4).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, supersample).cpu().float()
    return pooled[:, :3].contiguous(), pooled[:, 3:].contiguous()


@dataclass
class SyntheticScene:
    """One rendered synthetic scene, in memory."""

    category: str
    cameras: PerspectiveCameras   # (N) world cameras, float32, NDC of image_hw
    images: torch.Tensor          # (N, 3, H, W) RGB in [0, 1], unmasked
    masks: torch.Tensor           # (N, 1, H, W) foreground coverage in [0, 1]
    points: torch.Tensor          # (P, 3) world points on the object's surface
    image_hw: Tuple[int, int]     # (H, W)

    def to_scene(self, sequence_name="synthetic"):
        """Return the Scene of these views as they are (no crop), images masked as upstream's."""
        valid = torch.ones_like(self.masks)
        return Scene(
            sequence_name=sequence_name, category=self.category, images=self.images * self.masks,
            masks=self.masks, valid_region=valid, cameras=self.cameras,
            bbox=torch.stack([valid_region_box(v) for v in valid]),
            frame_numbers=torch.arange(len(self.cameras)), images_full=self.images,
        )


@dataclass
class SceneLayout:
    """Everything about a synthetic scene but its pixels."""

    obj: SyntheticObject
    world_rotation: torch.Tensor  # (3, 3) M in X_world = X_canonical @ M + offset
    world_offset: torch.Tensor    # (3,)
    cameras: PerspectiveCameras   # (N) world cameras, float64
    points: torch.Tensor          # (P, 3) world points on the object's surface, float64


def synthetic_layout(category, seed, n_views=8, image_hw=(150, 200), n_points=2000):
    """Return the SceneLayout of a category drawn from seed: object, world frame, cameras, surface points."""
    generator = torch.Generator().manual_seed(int(seed))
    obj = make_object(category, generator)
    world_rotation = random_rotation(generator)
    world_offset = torch.randn(3, generator=generator, dtype=torch.float64) * 0.1
    cameras = to_world(phone_orbit(n_views, obj.radius, image_hw, generator), world_rotation, world_offset)
    per_primitive = max(1, n_points // len(obj.primitives))
    points = object_surface_points(obj.primitives, per_primitive, generator) @ world_rotation + world_offset
    return SceneLayout(obj=obj, world_rotation=world_rotation, world_offset=world_offset, cameras=cameras,
                       points=points)


def render_synthetic_scene(category, seed, n_views=8, image_hw=(150, 200), supersample=2, n_points=2000, device="cpu"):
    """Return a SyntheticScene of a category drawn from seed: n_views views of image_hw = (H, W), traced on device."""
    layout = synthetic_layout(category, seed, n_views, image_hw, n_points)
    images, masks = render_views(layout.obj, layout.cameras, layout.world_rotation, layout.world_offset, supersample,
                                 device)
    return SyntheticScene(category=category, cameras=layout.cameras.to(torch.float32), images=images, masks=masks,
                          points=layout.points.float(), image_hw=tuple(image_hw))


# ---------------------------------------------------------------------------------------------
# Writing the CO3Dv2 layout
# ---------------------------------------------------------------------------------------------

def scene_seed(seed, category, index):
    """Return the seed of scene index of a category in a dataset generated from seed."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(category.encode()), int(index)]).generate_state(1)[0])


def sequence_name(seed, category, index):
    """Return the sequence name of scene index (names sort in index order, as CO3D's loaders sort them)."""
    return f"{seed}_{category}_{index:03d}"


def viewpoint_annotation(cameras, index, intrinsics_format):
    """Return CO3D's viewpoint dict of camera index, intrinsics stored in intrinsics_format."""
    image_hw = cameras.image_size[index].double()
    focal_px, principal_px = ndc_to_pixel_intrinsics(cameras.focal_length[index].double(),
                                                     cameras.principal_point[index].double(), image_hw)
    focal, principal = pixels_to_viewpoint(focal_px, principal_px, image_hw, intrinsics_format)
    return {"R": cameras.R[index].double().tolist(), "T": cameras.T[index].double().tolist(),
            "focal_length": focal.tolist(), "principal_point": principal.tolist(),
            "intrinsics_format": intrinsics_format}


def jgz_bytes(content):
    """Return content as gzipped JSON, byte-identical for identical content (no timestamp)."""
    return gzip.compress(json.dumps(content).encode("utf8"), mtime=0)


def to_uint8(image):
    """Return a (C, H, W) float image in [0, 1] as an (H, W, C) or (H, W) uint8 array."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def write_scene(root, category, index, seed, n_frames, image_hw, intrinsics_format, frame_type, supersample,
                device="cpu"):
    """Render scene index of a category, write its JPGs and mask PNGs; return its frame annotations."""
    name = sequence_name(seed, category, index)
    scene = render_synthetic_scene(category, scene_seed(seed, category, index), n_frames, image_hw, supersample,
                                   device=device)
    frames = []
    for k in range(n_frames):
        image_path = f"{category}/{name}/images/frame{k + 1:06d}.jpg"
        mask_path = f"{category}/{name}/masks/frame{k + 1:06d}.png"
        (Path(root) / image_path).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / mask_path).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(Path(root) / image_path, to_uint8(scene.images[k]), extension=".jpg", quality=95)
        mask = to_uint8(scene.masks[k])
        iio.imwrite(Path(root) / mask_path, mask, extension=".png")
        frames.append({
            "sequence_name": name, "frame_number": k, "frame_timestamp": k / 10.0,
            "image": {"path": image_path, "size": list(image_hw)},
            "depth": None,
            "mask": {"path": mask_path, "mass": float(mask.astype(np.float64).sum() / 255.0)},
            "viewpoint": viewpoint_annotation(scene.cameras, k, intrinsics_format),
            "meta": {"frame_type": frame_type, "frame_splits": [], "eval_batch_maps": []},
        })
    return frames


def set_lists(frames_by_sequence, eval_sequences):
    """Return {subset: {"train", "val", "test": [[sequence, frame_number, image_path], ...]}}.

    Training sequences are listed under "train" of every subset, evaluation sequences under "test"
    of fewview_dev and fewview_test.
    """
    def entries(names):
        return [[f["sequence_name"], f["frame_number"], f["image"]["path"]] for n in names for f in frames_by_sequence[n]]

    train = [n for n in frames_by_sequence if n not in eval_sequences]
    return {
        "fewview_train": {"train": entries(train), "val": [], "test": []},
        "fewview_dev": {"train": entries(train), "val": [], "test": entries(eval_sequences)},
        "fewview_test": {"train": entries(train), "val": [], "test": entries(eval_sequences)},
    }


def parse_image_size(text):
    """Return (H, W) of an 'HxW' string."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise UserError(f"image size {text!r} must read HxW, e.g. 150x200") from err
    if height < 8 or width < 8:
        raise UserError(f"image size {text!r} is too small (at least 8x8)")
    return height, width


def _write_scene_task(task):
    """Pool worker: write_scene on one (root, category, index, ...) tuple; returns its frames."""
    return write_scene(*task)


def generate_dataset(root, categories=("hydrant", "teddybear"), scenes=3, frames=32, seed=0,
                     image_sizes=((150, 200), (240, 160)), eval_scenes=None, supersample=2, show_progress=True,
                     workers=1, device="cpu"):
    """Write a synthetic dataset in the CO3Dv2 layout under root; return a summary dict.

    Scene i of a category uses image_sizes[i % len] and stores its intrinsics as
    INTRINSICS_FORMATS[i % 2] (both CO3D formats get exercised). The last eval_scenes scenes of each
    category (default: half, rounded up) are the evaluation sequences (fewview_dev/test "test").
    Scenes are rendered by `workers` processes, traced on device ('cpu' or 'cuda'); the files are the
    same for any number of workers (and differ between devices by float rounding).
    Annotations are written last and atomically, so a category with frame_annotations.jgz is complete.
    """
    unknown = [c for c in categories if c not in CATEGORY_BUILDERS]
    if unknown:
        raise UserError(f"unknown synthetic categories {unknown}; choose from {list(SYNTHETIC_CATEGORIES)}")
    if scenes < 1 or frames < 1 or workers < 1:
        raise UserError(f"--scenes, --frames and --workers must be at least 1, got {scenes}, {frames} and {workers}")
    eval_scenes = math.ceil(scenes / 2) if eval_scenes is None else eval_scenes
    if not 0 <= eval_scenes <= scenes:
        raise UserError(f"--eval-scenes must be between 0 and --scenes ({scenes}), got {eval_scenes}")
    start = time.time()
    remove_stale_temporaries(root)
    tasks = [(root, category, index, seed, frames, tuple(image_sizes[index % len(image_sizes)]),
              INTRINSICS_FORMATS[index % 2], "test_known" if index >= scenes - eval_scenes else "train_known",
              supersample, device) for category in categories for index in range(scenes)]
    with tqdm(total=len(tasks), desc="rendering", unit="scene", disable=not show_progress) as progress:
        written = []
        for frames_of_scene in _map(_write_scene_task, tasks, workers):
            written.append(frames_of_scene)
            progress.update(1)
    summary = {"root": str(root), "seed": seed, "frames_per_scene": frames, "categories": {}}
    for position, category in enumerate(categories):
        frames_by_sequence, eval_sequences, sizes = {}, [], []
        for index in range(scenes):
            name = sequence_name(seed, category, index)
            frames_by_sequence[name] = written[position * scenes + index]
            sizes.append(list(image_sizes[index % len(image_sizes)]))
            if index >= scenes - eval_scenes:
                eval_sequences.append(name)
        write_category_annotations(Path(root) / category, category, frames_by_sequence, eval_sequences)
        summary["categories"][category] = {
            "sequences": list(frames_by_sequence), "eval_sequences": eval_sequences,
            "image_sizes_hw": sizes, "frames": sum(len(f) for f in frames_by_sequence.values())}
    summary["total_frames"] = sum(c["frames"] for c in summary["categories"].values())
    summary["seconds"] = round(time.time() - start, 2)
    write_bytes(json.dumps(summary, indent=2).encode(), Path(root) / "synthetic_summary.json")
    return summary


def _map(function, items, workers):
    """Yield function(item) for items in order, in `workers` processes (in this one for workers == 1)."""
    if workers == 1:
        yield from map(function, items)
        return
    import multiprocessing
    # One intra-op thread per process: the processes fill the cores, and each with the machine's thread
    # count (16 on the device) oversubscribes it many times over.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap(function, items)


def write_category_annotations(folder, category, frames_by_sequence, eval_sequences):
    """Write a category's set lists, sequence and frame annotations (frame_annotations.jgz last)."""
    for subset, content in set_lists(frames_by_sequence, eval_sequences).items():
        write_bytes(json.dumps(content).encode(), folder / "set_lists" / f"set_lists_{subset}.json")
    sequences = [{"sequence_name": n, "category": category, "video": None, "point_cloud": None,
                  "viewpoint_quality_score": 1.0} for n in frames_by_sequence]
    write_bytes(jgz_bytes(sequences), folder / "sequence_annotations.jgz")
    all_frames = [f for n in frames_by_sequence for f in frames_by_sequence[n]]
    write_bytes(jgz_bytes(all_frames), folder / "frame_annotations.jgz")


def main(argv=None):
    """Parse the command line, write the dataset, print its JSON summary."""
    parser = argparse.ArgumentParser(description="Write a synthetic dataset in the CO3Dv2 on-disk format.")
    parser.add_argument("--root", default="data/synthetic", help="output folder (default: data/synthetic)")
    parser.add_argument("--categories", nargs="+", default=["hydrant", "teddybear"],
                        help=f"categories, from {', '.join(SYNTHETIC_CATEGORIES)}")
    parser.add_argument("--scenes", type=int, default=3, help="scenes (sequences) per category")
    parser.add_argument("--frames", type=int, default=32,
                        help="frames per scene (default 32: the views a demo scene takes; loaders skip scenes of <= 10)")
    parser.add_argument("--seed", type=int, default=0, help="everything follows from this seed")
    parser.add_argument("--image-sizes", nargs="+", default=["150x200", "240x160"],
                        help="HxW sizes, used by scenes in turn (default: 150x200 240x160)")
    parser.add_argument("--eval-scenes", type=int, default=None,
                        help="evaluation scenes per category (default: half of --scenes, rounded up)")
    parser.add_argument("--supersample", type=int, default=2, help="rays per pixel side (antialiasing)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering scenes in parallel (default: 1)")
    parser.add_argument("--device", default="cpu", help="where rays are traced: cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        summary = generate_dataset(args.root, args.categories, args.scenes, args.frames, args.seed,
                                   [parse_image_size(s) for s in args.image_sizes], args.eval_scenes,
                                   args.supersample, workers=args.workers, device=args.device)
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

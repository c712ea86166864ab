"""Custom scenes: synthetic scenes exported to transforms.json and COLMAP by an independent writer, read back.

The writer here takes our PyTorch3D-convention cameras through their own projection (pixel
coordinates of view-space points), not through the reader's conversion formulas, and writes the
files as nerfstudio and COLMAP document them.
"""

import json
import math
import struct
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import demo
from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.external.imagen_unet import UnetConfig
from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.data import load_dataset
from sparsefusion.data.co3d import CO3DConfig, CO3DDataset
from sparsefusion.data.colmap import read_colmap_views
from sparsefusion.data.conventions import cameras_from_opencv, opencv_from_opengl, rotation_from_quaternion
from sparsefusion.data.custom import MASK_NAMES, CustomConfig, CustomDataset, view_subset
from sparsefusion.data.nerfstudio import read_transforms_views
from sparsefusion.data.scene_scale import axes_meeting_point, co3d_like_normalization
from sparsefusion.data.synthetic import (SyntheticScene, generate_dataset, render_synthetic_scene, render_views,
                                         synthetic_layout)
from sparsefusion.data.views import cameras_of_views, view_indices_by_name
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, save_eft
from sparsefusion.errors import UserError
from sparsefusion.reconstruct import chosen_input_views
from sparsefusion.vae import save_vae
from sparsefusion.vldm import VLDM, VLDMConfig, save_vldm

N_VIEWS = 6


# ---------------------------------------------------------------------------------------------
# The independent writer
# ---------------------------------------------------------------------------------------------

def camera_frame(cameras, i):
    """Return (centre (3,), axes (3, 3) rows = our view +X, +Y, +Z in world coordinates) of camera i, float64."""
    camera = cameras[i].to(torch.float64)
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    world = camera.view_to_world(points[None])[0]
    return world[0], world[1:] - world[0]


def pixel_intrinsics(cameras, i):
    """Return (fx, fy, cx, cy) in pixels of camera i, read off its projection of two view-space points."""
    camera = cameras[i].to(torch.float64)
    # OpenCV's camera point (0, 0, 1) lands on (cx, cy); (1, 1, 1) on (fx + cx, fy + cy); ours has X, Y flipped
    view = torch.tensor([[[0.0, 0.0, 1.0], [-1.0, -1.0, 1.0]]], dtype=torch.float64)
    screen = camera.transform_points_screen(camera.view_to_world(view))[0, :, :2]
    (cx, cy), (u, v) = screen.tolist()
    return u - cx, v - cy, cx, cy


def c2w_opengl(cameras, i):
    """Return the 4x4 OpenGL camera-to-world matrix (list) of camera i: columns right, up, back, centre."""
    centre, axes = camera_frame(cameras, i)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = -axes[0], axes[1], -axes[2], centre
    return matrix.tolist()


def w2c_opencv(cameras, i):
    """Return (R (3, 3), t (3,)) of camera i in OpenCV's convention: rows right, down, forward."""
    centre, axes = camera_frame(cameras, i)
    R = torch.stack([-axes[0], -axes[1], axes[2]])
    return R, -R @ centre


def quaternion(R):
    """Return (qw, qx, qy, qz) with qw >= 0 of a rotation matrix (Shepperd's method)."""
    R = R.tolist()
    trace = R[0][0] + R[1][1] + R[2][2]
    if trace > 0:
        s = 2 * math.sqrt(1 + trace)
        q = (s / 4, (R[2][1] - R[1][2]) / s, (R[0][2] - R[2][0]) / s, (R[1][0] - R[0][1]) / s)
    elif R[0][0] > R[1][1] and R[0][0] > R[2][2]:
        s = 2 * math.sqrt(1 + R[0][0] - R[1][1] - R[2][2])
        q = ((R[2][1] - R[1][2]) / s, s / 4, (R[0][1] + R[1][0]) / s, (R[0][2] + R[2][0]) / s)
    elif R[1][1] > R[2][2]:
        s = 2 * math.sqrt(1 + R[1][1] - R[0][0] - R[2][2])
        q = ((R[0][2] - R[2][0]) / s, (R[0][1] + R[1][0]) / s, s / 4, (R[1][2] + R[2][1]) / s)
    else:
        s = 2 * math.sqrt(1 + R[2][2] - R[0][0] - R[1][1])
        q = ((R[1][0] - R[0][1]) / s, (R[0][2] + R[2][0]) / s, (R[1][2] + R[2][1]) / s, s / 4)
    return tuple(-v for v in q) if q[0] < 0 else q


def uint8(image):
    """Return a (C, H, W) float image in [0, 1] as (H, W, C) or (H, W) uint8."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def write_images(folder, scene, masks=True, mask_name="{stem}.png"):
    """Write images/frame_XX.png (and masks/ per mask_name); return the image names."""
    names = [f"frame_{k:02d}.png" for k in range(len(scene.images))]
    for name, image, mask in zip(names, scene.images, scene.masks):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        iio.imwrite(folder / "images" / name, uint8(image))
        if masks:
            path = folder / "masks" / mask_name.format(rel=name, stem=Path(name).stem)
            path.parent.mkdir(parents=True, exist_ok=True)
            iio.imwrite(path, uint8(mask), extension=".png")
    return names


def write_transforms(folder, scene, shared, masks=True, extra=None, frame_extra=None):
    """Export a SyntheticScene as nerfstudio's transforms.json (+ images, masks)."""
    names = write_images(folder, scene, masks)
    h, w = scene.image_hw
    content = {"camera_model": "OPENCV", **(extra or {}), "frames": []}
    if shared:
        fx, fy, cx, cy = pixel_intrinsics(scene.cameras, 0)
        content.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=w, h=h)
    for k, name in enumerate(names):
        frame = {"file_path": f"images/{name}", "transform_matrix": c2w_opengl(scene.cameras, k)}
        if not shared:
            fx, fy, cx, cy = pixel_intrinsics(scene.cameras, k)
            frame.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=w, h=h)
        frame.update((frame_extra or {}).get(k, {}))
        content["frames"].append(frame)
    (folder / "transforms.json").write_text(json.dumps(content, indent=1))
    return content


def colmap_entries(scene, shared):
    """Return (cameras [(id, model, w, h, params)], images [(id, qvec, tvec, camera_id, name)])."""
    h, w = scene.image_hw
    cameras = []
    for k in range(1 if shared else len(scene.images)):
        cameras.append((k + 1, "PINHOLE", w, h, pixel_intrinsics(scene.cameras, k)))
    images = []
    for k in range(len(scene.images)):
        R, t = w2c_opencv(scene.cameras, k)
        images.append((k + 1, quaternion(R), tuple(t.tolist()), 1 if shared else k + 1, f"frame_{k:02d}.png"))
    return cameras, images


def write_colmap_text(model_dir, cameras, images):
    """Write cameras.txt and images.txt as COLMAP does (headers, a POINTS2D line per image, some empty)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
             f"# Number of cameras: {len(cameras)}"]
    lines += [f"{cid} {model} {w} {h} " + " ".join(repr(float(p)) for p in params) for cid, model, w, h, params in cameras]
    (model_dir / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
             "#   POINTS2D[] as (X, Y, POINT3D_ID)", f"# Number of images: {len(images)}"]
    for k, (iid, q, t, cid, name) in enumerate(images):
        lines.append(" ".join([str(iid), *map(repr, q), *map(repr, t), str(cid), name]))
        lines.append("" if k % 2 else "10.5 20.25 -1 11.0 3.5 7")
    (model_dir / "images.txt").write_text("\n".join(lines) + "\n")
    (model_dir / "points3D.txt").write_text("# 3D point list with one line of data per point:\n")


MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4, "OPENCV_FISHEYE": 5}


def write_colmap_binary(model_dir, cameras, images):
    """Write cameras.bin and images.bin in COLMAP's little-endian layout."""
    model_dir.mkdir(parents=True, exist_ok=True)
    data = struct.pack("<Q", len(cameras))
    for cid, model, w, h, params in cameras:
        data += struct.pack("<iiQQ", cid, MODEL_IDS[model], w, h) + struct.pack(f"<{len(params)}d", *params)
    (model_dir / "cameras.bin").write_bytes(data)
    data = struct.pack("<Q", len(images))
    for k, (iid, q, t, cid, name) in enumerate(images):
        data += struct.pack("<I4d3dI", iid, *q, *t, cid) + name.encode() + b"\x00"
        points = [(10.5, 20.25, -1), (11.0, 3.5, 7)] if k % 2 == 0 else []
        data += struct.pack("<Q", len(points)) + b"".join(struct.pack("<ddq", *p) for p in points)
    (model_dir / "images.bin").write_bytes(data)
    (model_dir / "points3D.bin").write_bytes(struct.pack("<Q", 0))


def write_colmap(folder, scene, shared, binary, masks=True, mask_name="{stem}.png"):
    """Export a SyntheticScene as a COLMAP model in sparse/0 (+ images/, masks/)."""
    write_images(folder, scene, masks, mask_name)
    cameras, images = colmap_entries(scene, shared)
    (write_colmap_binary if binary else write_colmap_text)(folder / "sparse" / "0", cameras, images)


def export(folder, scene, fmt, shared, **kwargs):
    """Export scene in fmt: 'transforms', 'colmap_text' or 'colmap_binary'."""
    if fmt == "transforms":
        write_transforms(folder, scene, shared, **kwargs)
    else:
        write_colmap(folder, scene, shared, binary=fmt == "colmap_binary", **kwargs)
    return folder


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

def scene_with_intrinsics(category, seed, image_hw, principal=None):
    """Return a SyntheticScene whose cameras all share camera 0's focal length (and principal point, or principal)."""
    layout = synthetic_layout(category, seed, N_VIEWS, image_hw, 400)
    cameras = layout.cameras
    principal = cameras.principal_point[:1] if principal is None else torch.tensor([principal], dtype=torch.float64)
    cameras = PerspectiveCameras(R=cameras.R, T=cameras.T, focal_length=cameras.focal_length[:1].expand(N_VIEWS, 2),
                                 principal_point=principal.expand(N_VIEWS, 2), image_size=cameras.image_size)
    images, masks = render_views(layout.obj, cameras, layout.world_rotation, layout.world_offset)
    return SyntheticScene(category=category, cameras=cameras.to(torch.float32), images=images, masks=masks,
                          points=layout.points.float(), image_hw=tuple(image_hw))


@pytest.fixture(scope="module")
def scenes():
    """Two scenes: per-frame intrinsics on a landscape image, shared intrinsics on a portrait one."""
    return {"per_frame": render_synthetic_scene("hydrant", 4, N_VIEWS, (48, 64), n_points=400),
            "shared": scene_with_intrinsics("teddybear", 5, (64, 48))}


def custom(folder, **options):
    return load_dataset("custom", folder, "hydrant", **{"image_size": 64, **options})


# ---------------------------------------------------------------------------------------------
# Conventions
# ---------------------------------------------------------------------------------------------

def test_conventions_agree_with_opencvs_projection():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        q = torch.randn(4, generator=generator, dtype=torch.float64)
        R_cv = rotation_from_quaternion(q)
        assert torch.allclose(R_cv @ R_cv.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(torch.tensor(quaternion(R_cv), dtype=torch.float64), q / q.norm() * q[0].sign(), atol=1e-12)
        t = torch.randn(3, generator=generator, dtype=torch.float64) + torch.tensor([0, 0, 6.0], dtype=torch.float64)
        fx, fy, cx, cy, h, w = 70.0, 64.0, 33.0, 21.5, 48, 64
        cameras = cameras_from_opencv(R_cv[None], t[None], torch.tensor([[fx, fy]], dtype=torch.float64),
                                      torch.tensor([[cx, cy]], dtype=torch.float64), torch.tensor([[h, w]]))
        points = torch.randn(20, 3, generator=generator, dtype=torch.float64)
        camera = R_cv @ points.T + t[:, None]                     # OpenCV: K [R | t] X
        expected = torch.stack([fx * camera[0] / camera[2] + cx, fy * camera[1] / camera[2] + cy], dim=-1)
        assert torch.allclose(cameras.transform_points_screen(points)[0, :, :2], expected, atol=1e-9)
        # OpenGL camera-to-world of the same camera: the camera looks down its -Z, +Y up
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, :3] = R_cv.T @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
        c2w[:3, 3] = -R_cv.T @ t
        R_back, t_back = opencv_from_opengl(c2w)
        assert torch.allclose(R_back, R_cv, atol=1e-12) and torch.allclose(t_back, t, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

FORMATS = ("transforms", "colmap_text", "colmap_binary")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["per_frame", "shared"])
def test_reader_returns_the_exported_cameras_and_points_land_on_the_masks(scenes, tmp_path, fmt, kind):
    scene = scenes[kind]
    export(tmp_path, scene, fmt, shared=kind == "shared")
    dataset = custom(tmp_path, normalize="none")
    assert dataset.format == ("transforms" if fmt == "transforms" else "colmap")
    # exactly the exported cameras, before any crop
    read = cameras_of_views(dataset.sequences[dataset.sequence_names[0]])
    truth = scene.cameras.to(torch.float64)
    for name in ("R", "T", "focal_length", "principal_point", "image_size"):
        assert torch.allclose(getattr(read, name), getattr(truth, name), atol=1e-5), name

    # after the CO3D-scale normalisation, crop and resize: the object's surface points land on its masks
    dataset = custom(tmp_path)
    loaded = dataset[0]
    assert len(loaded) == N_VIEWS and loaded.images.shape == (N_VIEWS, 3, 64, 64) and loaded.has_masks
    assert loaded.frame_names == [f"{'images/' if fmt == 'transforms' else ''}frame_{k:02d}.png" for k in range(N_VIEWS)]
    norm = dataset.normalizations[dataset.sequence_names[0]]
    points = ((scene.points.double() - norm["centre"]) * norm["scale"]).float()
    screen = loaded.cameras.transform_points_screen(points)[..., :2]
    assert (screen > 0).all() and (screen < 64).all()
    pixels = screen.floor().long()
    grown = F.max_pool2d(loaded.masks, 3, stride=1, padding=1)            # one output pixel of slack
    for view in range(N_VIEWS):
        on_mask = grown[view, 0, pixels[view, :, 1], pixels[view, :, 0]]
        assert (on_mask > 0).all(), f"view {view}: {(on_mask == 0).sum()} points off the mask"
    assert 0.1 < loaded.masks.mean() < 0.8
    # the crop is CO3D's: the foreground fills the crop but for its 30 % context
    assert torch.allclose(loaded.images, loaded.images_full * loaded.masks)


def test_normalisation_centres_on_the_axes_meeting_point_at_the_co3d_distance(scenes, tmp_path):
    scene = scenes["per_frame"]
    export(tmp_path, scene, "transforms", shared=False)
    dataset = custom(tmp_path, camera_distance=8.0)
    norm = dataset.normalizations[dataset.sequence_names[0]]
    loaded = dataset[0]
    # cropping changes intrinsics only: the normalised poses are the cameras' own
    centres = loaded.cameras.get_camera_center().double()
    assert abs(centres.norm(dim=-1).mean() - 8.0) < 1e-4
    # the origin is where the optical axes pass nearest: the gradient of Σ dist² to the axes vanishes there
    axes = F.normalize(loaded.cameras.R[:, :, 2].double(), dim=-1)
    across = centres - (centres * axes).sum(-1, keepdim=True) * axes           # each axis's point nearest the origin
    assert across.sum(dim=0).norm() < 1e-4 * centres.norm(dim=-1).mean()
    # and the object sits there, well inside the NeRF's [-4, 4]^3
    points = (scene.points.double() - norm["centre"]) * norm["scale"]
    assert points.mean(dim=0).norm() < 0.5 and points.abs().max() < 4.0
    # the rule refuses cameras that look at no common point
    parallel = PerspectiveCameras.identity(3, dtype=torch.float64)
    parallel.T = torch.tensor([[0.0, 0, 5], [1.0, 0, 5], [2.0, 0, 5]], dtype=torch.float64)
    with pytest.raises(UserError, match="parallel"):
        co3d_like_normalization(parallel)
    centre, conditioning = axes_meeting_point(loaded.cameras)
    assert centre.norm() < 1e-4 and conditioning > 0.05


# ---------------------------------------------------------------------------------------------
# Masks, views, CO3D-style annotations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", MASK_NAMES)
def test_every_documented_mask_name_is_found(scenes, tmp_path, pattern):
    scene = scenes["per_frame"]
    write_colmap(tmp_path, scene, shared=False, binary=False, mask_name=pattern)
    loaded = custom(tmp_path, max_views=2)[0]
    assert loaded.has_masks and 0.1 < loaded.masks.mean() < 0.8


def test_without_masks_the_whole_image_is_foreground(scenes, tmp_path):
    scene = scenes["per_frame"]
    export(tmp_path, scene, "colmap_text", shared=False, masks=False)
    loaded = custom(tmp_path)[0]
    assert not loaded.has_masks
    assert torch.equal(loaded.masks, loaded.valid_region)
    # the whole 48x64 image, scaled by 1: 48 rows of content, no crop
    assert loaded.valid_region[0, 0, :, 0].sum() == 48 and loaded.valid_region[0, 0, 0].sum() == 64
    assert torch.equal(loaded.images, loaded.images_full)


def test_alpha_channels_and_label_masks(scenes, tmp_path):
    scene = scenes["per_frame"]
    export(tmp_path / "rgba", scene, "colmap_text", shared=False, masks=False)
    for k, (image, mask) in enumerate(zip(scene.images, scene.masks)):
        iio.imwrite(tmp_path / "rgba" / "images" / f"frame_{k:02d}.png", uint8(torch.cat([image, mask])))
    export(tmp_path / "label", scene, "colmap_text", shared=False, masks=False)
    (tmp_path / "label" / "masks").mkdir()
    for k, mask in enumerate(scene.masks):
        iio.imwrite(tmp_path / "label" / "masks" / f"frame_{k:02d}.png", (mask[0] > 0.5).numpy().astype(np.uint8))
    export(tmp_path / "cutout", scene, "colmap_text", shared=False, masks=False)
    (tmp_path / "cutout" / "masks").mkdir()
    for k, (image, mask) in enumerate(zip(scene.images, scene.masks)):  # rembg-style RGBA cut-outs as masks
        iio.imwrite(tmp_path / "cutout" / "masks" / f"frame_{k:02d}.png", uint8(torch.cat([image * mask, mask])))
    export(tmp_path / "opaque", scene, "colmap_text", shared=False, masks=False)
    for k, image in enumerate(scene.images):  # an alpha channel that is opaque everywhere is no mask
        iio.imwrite(tmp_path / "opaque" / "images" / f"frame_{k:02d}.png", uint8(torch.cat([image, torch.ones_like(image[:1])])))
    with_alpha, labels, cutouts = (custom(tmp_path / name)[0] for name in ("rgba", "label", "cutout"))
    assert with_alpha.has_masks and labels.has_masks and cutouts.has_masks
    assert not custom(tmp_path / "opaque")[0].has_masks
    assert (labels.masks.unique() == torch.tensor([0.0, 1.0])).all()
    assert (with_alpha.masks - labels.masks).abs().mean() < 0.05
    assert torch.equal(with_alpha.masks, cutouts.masks)


def test_view_subset_and_names():
    assert view_subset(10, 0) == list(range(10)) and view_subset(4, 8) == [0, 1, 2, 3]
    assert view_subset(10, 4) == [0, 3, 6, 9] and view_subset(10, 4, [5]) == [0, 3, 5, 6, 9]
    names = ["images/a_01.png", "images/a_02.png", "other/a_02.jpg"]
    assert view_indices_by_name(names, ["images/a_02.png", "a_01.png", "a_01", "a_02.jpg"]) == [1, 0, 0, 2]
    with pytest.raises(UserError, match="'a_02' names several views"):
        view_indices_by_name(names, ["a_02"])
    with pytest.raises(UserError, match="has no view named 'b'"):
        view_indices_by_name(names, ["b"])


def test_max_views_keeps_the_named_views(scenes, tmp_path):
    export(tmp_path, scenes["per_frame"], "transforms", shared=True)
    assert custom(tmp_path, max_views=2)[0].frame_names == ["images/frame_00.png", "images/frame_05.png"]
    picked = custom(tmp_path, max_views=2, include=("frame_03",))[0]
    assert picked.frame_names == ["images/frame_00.png", "images/frame_03.png", "images/frame_05.png"]
    assert picked.frame_numbers.tolist() == [0, 3, 5]


def test_co3d_style_annotations_load_as_the_co3d_reader_loads_them(tmp_path):
    generate_dataset(tmp_path, ["apple"], scenes=1, frames=4, seed=2, image_sizes=[(48, 64)], eval_scenes=1,
                     show_progress=False)
    ours = load_dataset("custom", tmp_path / "apple", "apple", image_size=64)
    assert ours.format == "co3d" and ours.normalize == "none"
    theirs = CO3DDataset(CO3DConfig(root=str(tmp_path), category="apple", subset="fewview_test", image_size=64))
    a, b = ours[0], theirs[0]
    assert a.sequence_name == b.sequence_name and a.frame_numbers.tolist() == b.frame_numbers.tolist()
    for name in ("images", "masks", "valid_region", "bbox"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("R", "T", "focal_length", "principal_point", "image_size"):
        assert torch.allclose(getattr(a.cameras, name), getattr(b.cameras, name), atol=1e-5), name


# ---------------------------------------------------------------------------------------------
# Warnings and errors
# ---------------------------------------------------------------------------------------------

def test_distortion_is_ignored_with_one_warning(scenes, tmp_path, capsys):
    export(tmp_path, scenes["shared"], "transforms", shared=True, extra={"k1": 0.01, "p2": -0.002})
    plain = cameras_of_views(read_transforms_views(tmp_path / "transforms.json", warn=lambda m: None))
    dataset = CustomDataset(CustomConfig(root=str(tmp_path), image_size=64))
    CustomDataset(CustomConfig(root=str(tmp_path), image_size=64))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transforms.json" in err[0] and "distortion" in err[0] and "ignored" in err[0]
    assert torch.equal(cameras_of_views(dataset.sequences[dataset.sequence_names[0]]).R, plain.R)


def instant_ngp(folder, scene):
    """Export as instant-ngp's NeRF-synthetic variant: camera_angle_x, no w/h/cx/cy, file paths without extension."""
    content = write_transforms(folder, scene, shared=True)
    fx = content.pop("fl_x")
    for key in ("fl_y", "cx", "cy", "w", "h", "camera_model"):
        content.pop(key)
    content["camera_angle_x"] = 2 * math.atan(scene.image_hw[1] / (2 * fx))
    for frame in content["frames"]:
        frame["file_path"] = "./" + frame["file_path"].removesuffix(".png")
    (folder / "transforms.json").write_text(json.dumps(content))


def test_instant_ngp_variant(tmp_path):
    # instant-ngp's NeRF-synthetic variant has one focal length and a centred principal point
    scene = scene_with_intrinsics("ball", 1, (48, 64), principal=(0.0, 0.0))
    instant_ngp(tmp_path, scene)
    read = cameras_of_views(read_transforms_views(tmp_path / "transforms.json"))
    for name in ("R", "T", "focal_length", "principal_point", "image_size"):
        assert torch.allclose(getattr(read, name), getattr(scene.cameras, name).double(), atol=1e-5), name


def edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def edit_text(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def no_pose(folder):
    edit_json(folder / "transforms.json", lambda c: c["frames"][2].pop("transform_matrix"))


def fisheye(folder):
    edit_json(folder / "transforms.json", lambda c: c.update(camera_model="OPENCV_FISHEYE"))


def wrong_size(folder):
    edit_json(folder / "transforms.json", lambda c: c["frames"][1].update(w=128, h=96))


def missing_image(folder):
    (folder / "images" / "frame_03.png").unlink()


def not_json(folder):
    (folder / "transforms.json").write_text("{frames: oops")


def no_focal(folder):
    edit_json(folder / "transforms.json", lambda c: [f.pop("fl_x") for f in c["frames"]])


def missing_mask(folder):
    (folder / "masks" / "frame_04.png").unlink()


def scaled_pose(folder):
    edit_json(folder / "transforms.json",
              lambda c: c["frames"][0].update(transform_matrix=(2 * np.array(c["frames"][0]["transform_matrix"])).tolist()))


def colmap_model_name(folder):
    edit_text(folder / "sparse" / "0" / "cameras.txt", "PINHOLE", "FULL_OPENCV")


def colmap_no_images(folder):
    (folder / "sparse" / "0" / "images.txt").unlink()


def colmap_wrong_size(folder):
    edit_text(folder / "sparse" / "0" / "cameras.txt", "1 PINHOLE 64 48", "1 PINHOLE 640 480")


def colmap_unknown_camera(folder):
    edit_text(folder / "sparse" / "0" / "images.txt", " 1 frame_01.png", " 9 frame_01.png")


def colmap_bad_line(folder):
    edit_text(folder / "sparse" / "0" / "cameras.txt", "1 PINHOLE 64 48", "1 PINHOLE 64")


def colmap_fisheye_binary(folder):
    path = folder / "sparse" / "0" / "cameras.bin"
    data = bytearray(path.read_bytes())
    data[12:16] = struct.pack("<i", 5)  # camera 1's model id: OPENCV_FISHEYE
    path.write_bytes(bytes(data))


def colmap_truncated(folder):
    path = folder / "sparse" / "0" / "images.bin"
    path.write_bytes(path.read_bytes()[:-30])


@pytest.mark.parametrize("fmt, damage, file, problem", [
    ("transforms", no_pose, "transforms.json frame 2", "has no transform_matrix"),
    ("transforms", fisheye, "transforms.json frame 0", "camera model OPENCV_FISHEYE is not supported"),
    ("transforms", wrong_size, "frame_01.png", "is 64x48 (WxH) but its camera is for 128x96"),
    ("transforms", missing_image, "frame_03.png", "image not found"),
    ("transforms", not_json, "transforms.json", "is not valid JSON"),
    ("transforms", no_focal, "transforms.json frame 0", "no focal length"),
    ("transforms", missing_mask, "frame_04.png", "no mask for frame_04.png"),
    ("transforms", scaled_pose, "transforms.json frame 0", "is not a rotation"),
    ("colmap_text", colmap_model_name, "cameras.txt line 4", "camera model FULL_OPENCV is not supported"),
    ("colmap_text", colmap_no_images, "cameras.txt is there but images.txt is missing", "sparse/0"),
    ("colmap_text", colmap_wrong_size, "frame_00.png", "is 64x48 (WxH) but its camera is for 640x480"),
    ("colmap_text", colmap_unknown_camera, "images.txt image 2", "camera 9 is not in"),
    ("colmap_text", colmap_bad_line, "cameras.txt line 4", "expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]"),
    ("colmap_binary", colmap_fisheye_binary, "cameras.bin camera 1", "camera model OPENCV_FISHEYE is not supported"),
    ("colmap_binary", colmap_truncated, "images.bin", "is truncated"),
])
def test_malformed_input_gives_one_line_naming_the_file(scenes, tmp_path, fmt, damage, file, problem):
    export(tmp_path, scenes["per_frame"], fmt, shared=fmt != "transforms")
    damage(tmp_path)
    with pytest.raises(UserError) as info:
        custom(tmp_path)[0]
    message = str(info.value)
    assert "\n" not in message and file in message and problem in message, message


def test_bad_folders_and_options(tmp_path):
    with pytest.raises(UserError, match="custom scene folder not found"):
        custom(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no camera file in"):
        custom(tmp_path)
    with pytest.raises(UserError, match="custom.normalize must be one of"):
        custom(tmp_path, normalize="unit")
    with pytest.raises(UserError, match="unknown custom scene option"):
        custom(tmp_path, resize="exact")
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": []}))
    with pytest.raises(UserError, match="custom.cameras=colmap but .* has no sparse/0/cameras.bin"):
        custom(tmp_path, cameras="colmap")
    with pytest.raises(UserError, match="non-empty 'frames' list"):
        custom(tmp_path)


# ---------------------------------------------------------------------------------------------
# A maintained reader agrees (when installed)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_pycolmap_reads_the_same_poses(scenes, tmp_path, binary):
    pycolmap = pytest.importorskip("pycolmap")
    write_colmap(tmp_path, scenes["shared"], shared=True, binary=binary)
    ours = read_colmap_views(tmp_path / "sparse" / "0", tmp_path / "images")
    reconstruction = pycolmap.Reconstruction(str(tmp_path / "sparse" / "0"))
    by_name = {image.name: image for image in reconstruction.images.values()}
    for view in ours:
        pose = by_name[view.name].cam_from_world()
        matrix = torch.tensor(np.asarray(pose.matrix()), dtype=torch.float64)
        assert torch.allclose(matrix[:, :3], view.R_cv, atol=1e-9) and torch.allclose(matrix[:, 3], view.t_cv, atol=1e-9)
        camera = reconstruction.cameras[by_name[view.name].camera_id]
        assert torch.allclose(view.focal_px, torch.tensor([camera.focal_length_x, camera.focal_length_y],
                                                          dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# demo.py on an exported scene
# ---------------------------------------------------------------------------------------------

SIZE = 32
SMALL_RUN = ["--image_size", str(SIZE), "--iterations", "6", "--fusion_start", "5", "--train_rays", "16",
             "--circle_cameras", "2", "--turntable_frames", "2", "--num_steps", "6", "--upsample_steps", "6",
             "--mesh_resolution", "16", "--mesh_threshold", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny EFT / VLDM / VAE checkpoints saved by our own modules; returns demo.py's flags for them."""
    root = tmp_path_factory.mktemp("models")
    eft = EpipolarFeatureTransformer(EFTConfig(hidden_dim=16, n_layers=1, backbone_weights="random"))
    save_eft(eft, root / "eft.pt")
    vldm = VLDM(VLDMConfig(unet=UnetConfig.small(cond_images_channels=16), image_size=SIZE // 8))
    save_vldm(vldm, root / "vldm.pt")
    save_vae(AutoencoderKL(AutoencoderKLConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4)),
             root / "vae.ckpt")
    return ["-e", str(root / "eft.pt"), "-l", str(root / "vldm.pt"), "-a", str(root / "vae.ckpt"), *SMALL_RUN]


def run_demo(folder, out, models, *extra):
    """Run demo.py -d custom on folder; return the scene's metrics record."""
    demo.main(["-d", "custom", "-r", str(folder), "-c", "hydrant", "-o", str(out), *models, *extra])
    (record,) = [json.loads(p.read_text()) for p in (out / "metrics").glob("*.json")]
    return record


def test_demo_reconstructs_an_exported_scene_from_named_views(scenes, models, tmp_path, capsys):
    folder = export(tmp_path / "my_scene", scenes["per_frame"], "transforms", shared=False)
    record = run_demo(folder, tmp_path / "out", models, "--input_names", "frame_01,images/frame_04.png")
    assert record["sequence"] == "hydrant_000_c2" and record["source_sequence"] == "my_scene"
    assert record["input_views"] == [1, 4] and record["n_views"] == N_VIEWS
    assert record["config"]["silhouette_weight"] == 1.0
    assert (tmp_path / "out" / "render_gifs" / "hydrant_000_c2.gif").is_file()
    assert "mask" not in capsys.readouterr().err


def test_demo_runs_without_masks_with_the_silhouette_terms_off(scenes, models, tmp_path, capsys):
    folder = export(tmp_path / "bare", scenes["shared"], "colmap_binary", shared=True, masks=False)
    record = run_demo(folder, tmp_path / "out", models, "--input_index", "0,2,5")
    assert record["sequence"] == "hydrant_000_c3" and record["input_views"] == [0, 2, 5]
    assert record["config"]["silhouette_weight"] == 0.0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "mask" in line]
    assert len(warnings) == 1 and "no foreground masks" in warnings[0] and "silhouette terms are off" in warnings[0]


@pytest.mark.parametrize("extra, message", [
    (["--input_names", "frame_09"], "has no view named 'frame_09'"),
    (["--input_index", "0,7"], "input_index 0,7 is out of range: scene my_scene has 6 views"),
    (["--input_index", "1", "--input_names", "frame_00"], "by input_names or by input_index, not both"),
    (["--input_index", "2,2"], "the input views 2,2 choose a view twice"),
    (["--input_index", "1,-2"], "input_index '1,-2' has a negative index"),
    (["custom.normalize=unit"], "custom.normalize must be one of"),
    (["-r", "nowhere"], "custom scene folder not found: nowhere"),
])
def test_demo_bad_custom_input_fails_with_one_line(scenes, models, tmp_path, capsys, extra, message):
    folder = export(tmp_path / "my_scene", scenes["per_frame"], "transforms", shared=False)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["-d", "custom", "-r", str(folder), "-c", "hydrant", "-o", str(tmp_path / "out"), *models, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_input_views_by_index_work_for_any_dataset_and_names_need_named_views(scenes):
    unnamed = scenes["per_frame"].to_scene()                      # a scene without frame_names, as CO3D's
    assert chosen_input_views(unnamed, [], [4, 1]) == [4, 1] and chosen_input_views(unnamed) is None
    with pytest.raises(UserError, match="input_names needs views with names"):
        chosen_input_views(unnamed, ["frame_01"])

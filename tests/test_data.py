import gzip
import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.cameras import PerspectiveCameras, look_at_view_transform
from sparsefusion.data import CO3D_ALL_CATEGORIES, CO3D_ALL_TEN, Scene, expand_categories, load_dataset
from sparsefusion.data.co3d import pixels_to_viewpoint, viewpoint_to_pixels
from sparsefusion.data.crop import (camera_scales, crop, crop_box, cropped_cameras, foreground_box,
                                    resize_and_pad, valid_region_box)
from sparsefusion.data.shapes import Primitive, hit_object, inside_object, rotation
from sparsefusion.data.synthetic import (generate_dataset, main, render_synthetic_scene, scene_seed,
                                         sequence_name, synthetic_layout)
from sparsefusion.data.toy import save_toy, toy_path
from sparsefusion.errors import UserError

CATEGORIES = ("hydrant", "teddybear")
SIZES = ((60, 80), (90, 60))  # (H, W): landscape, portrait
FRAMES = 12                   # > 10: upstream's loaders drop shorter sequences


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """A small generated dataset: 2 categories × 2 scenes × 12 frames; scene 1 of each is for evaluation."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, CATEGORIES, scenes=2, frames=FRAMES, seed=3, image_sizes=SIZES, show_progress=False)
    return root


@pytest.fixture
def root_copy(synthetic_root, tmp_path):
    return shutil.copytree(synthetic_root, tmp_path / "copy")


def cameras_looking_at_origin(n, image_hw, dtype=torch.float64):
    eye = torch.randn(n, 3, dtype=dtype)
    eye = 5.0 * eye / eye.norm(dim=1, keepdim=True)
    R, T = look_at_view_transform(eye, torch.zeros(1, 3, dtype=dtype), torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype))
    return PerspectiveCameras(R=R, T=T, focal_length=torch.rand(n, 2, dtype=dtype) + 1.5,
                              principal_point=torch.rand(n, 2, dtype=dtype) * 0.2 - 0.1,
                              image_size=torch.tensor([image_hw], dtype=dtype).expand(n, 2).clone())


# ---------------------------------------------------------------------------------------------
# crop.py
# ---------------------------------------------------------------------------------------------

def test_foreground_box_and_crop_box_follow_implicitron():
    mask = torch.zeros(1, 40, 50)
    mask[0, 10:20, 5:30] = 0.9
    mask[0, 25, 40] = 0.3  # below the 0.4 threshold
    assert foreground_box(mask).tolist() == [5, 10, 25, 10]  # x0, y0, w, h with exclusive far edges
    # grow by 30 %: x0 5 - 3.75, y0 10 - 1.5, w 32.5, h 13; clamp; round half to even
    assert crop_box(torch.tensor([5, 10, 25, 10]), (40, 50), 0.3).tolist() == [1, 8, 34, 22]
    assert crop_box(torch.tensor([0, 0, 50, 40]), (40, 50), 0.3).tolist() == [0, 0, 50, 40]  # clamped
    # a faint mask: the threshold drops by 0.05 until more than one pixel passes
    faint = torch.zeros(1, 10, 10)
    faint[0, 2:4, 3:6] = 0.2
    assert foreground_box(faint).tolist() == [3, 2, 3, 2]
    with pytest.raises(ValueError, match="no pixels"):
        crop_box(torch.tensor([3, 3, 1, 1]), (10, 10), 0.0)


def test_resize_keeps_upstreams_one_pixel_short_content():
    # float rounding makes floor(49 · 256/49) = 255: the last row is padding, as upstream
    image = torch.rand(3, 49, 30)
    resized, scale, content_hw, valid = resize_and_pad(image, (256, 256))
    assert content_hw == (255, 156) and scale == 256 / 49
    assert valid[0, :255, :156].all() and valid[0, 255].sum() == 0 and valid[0, :, 156:].sum() == 0
    assert (resized[:, 255:] == 0).all()
    box = valid_region_box(valid)
    assert torch.allclose(box, (torch.tensor([0.0, 0.0, 254.0, 155.0]) - 128) / 128)


@pytest.mark.parametrize("out_side", [256, 32])  # up- and down-scaling
def test_cropped_cameras_project_where_the_resized_image_moved_the_pixels(out_side):
    """Resize a ramp image whose values are their own pixel coordinates; sampling it at the new camera's
    projection must give the original camera's projection (bilinear interpolation of a linear
    function is exact)."""
    image_hw = (90, 120)
    camera = cameras_looking_at_origin(1, image_hw)
    points = torch.rand(1, 200, 3, dtype=torch.float64) * 1.6 - 0.8
    original = camera.transform_points_screen(points)[0, :, :2]
    box = torch.tensor([13, 7, 84, 60])
    ys, xs = torch.meshgrid(torch.arange(90.0) + 0.5, torch.arange(120.0) + 0.5, indexing="ij")
    ramp = torch.stack([xs, ys]).double()
    cropped = crop(ramp, box)
    resized, scale, content_hw, _ = resize_and_pad(cropped, (out_side, out_side))
    # keep points at least 2 source pixels inside the crop, where bilinear sampling is not clamped
    inside = ((original - box[:2]) > 2).all(1) & ((box[2:] - original) > 2).all(1)
    assert inside.sum() > 50
    errors = {}
    for mode in ("upstream", "exact"):
        scales = camera_scales(scale, cropped.shape[-2:], content_hw, mode)[None]
        new = cropped_cameras(camera, box[None], scales, (out_side, out_side))
        projected = new.transform_points_screen(points)[0, inside, :2]
        grid = (projected / out_side * 2 - 1)[None, None]
        sampled = F.grid_sample(resized[None], grid, mode="bilinear", align_corners=False)[0, :, 0].T
        errors[mode] = (sampled - original[inside]).abs().max()
        in_output_px = (projected - (original[inside] - box[:2]) * torch.tensor(content_hw[::-1]) / torch.tensor(
            cropped.shape[-2:][::-1])).abs().max()
        assert new.image_size.tolist() == [[out_side, out_side]]
        if mode == "upstream":
            assert in_output_px < 1.0  # the nominal scale drifts by under a pixel along the short side
    assert errors["exact"] < 1e-6


def test_intrinsics_formats_convert_both_ways_and_match_a_pinhole():
    image_hw = torch.tensor([100.0, 200.0], dtype=torch.float64)  # H, W
    focal, principal = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([0.1, -0.2], dtype=torch.float64)
    f_px, p_px = viewpoint_to_pixels(focal, principal, image_hw, "ndc_norm_image_bounds")
    assert f_px.tolist() == [100.0, 50.0] and torch.allclose(p_px, torch.tensor([90.0, 60.0], dtype=torch.float64))
    f_px, p_px = viewpoint_to_pixels(focal, principal, image_hw, "ndc_isotropic")
    assert f_px.tolist() == [50.0, 50.0] and torch.allclose(p_px, torch.tensor([95.0, 60.0], dtype=torch.float64))
    for fmt in ("ndc_norm_image_bounds", "ndc_isotropic"):
        back = pixels_to_viewpoint(*viewpoint_to_pixels(focal, principal, image_hw, fmt), image_hw, fmt)
        assert torch.allclose(back[0], focal) and torch.allclose(back[1], principal)
    with pytest.raises(ValueError, match="intrinsics_format"):
        viewpoint_to_pixels(focal, principal, image_hw, "screen")


@pytest.mark.parametrize("kind", ["ellipsoid", "cylinder", "box"])
def test_ray_hits_agree_with_marching_through_the_solid(kind):
    generator = torch.Generator().manual_seed(0)
    prim = Primitive(kind=kind, center=torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64),
                     axes=rotation(torch.tensor([1.0, 2.0, 0.5]), 0.7),
                     size=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), color=torch.ones(3, dtype=torch.float64))
    o = F.normalize(torch.randn(300, 3, generator=generator, dtype=torch.float64), dim=-1) * 3
    d = (torch.rand(300, 3, generator=generator, dtype=torch.float64) - 0.5) * 0.8 - o  # aimed near the centre
    t, _, _ = hit_object([prim], o, d)
    step = 1e-3
    ts = torch.arange(0, 2, step, dtype=torch.float64)
    inside = inside_object([prim], (o[:, None] + ts[None, :, None] * d[:, None]).reshape(-1, 3), 0.0).reshape(300, -1)
    marched = torch.where(inside.any(1), ts[inside.int().argmax(1)], torch.full_like(t, math.inf))
    assert torch.isfinite(t).sum() > 80 and torch.isinf(t).sum() > 20
    assert torch.isinf(marched[torch.isinf(t)]).all()  # no ray the tracer misses passes through the solid
    both = torch.isfinite(t) & torch.isfinite(marched)
    assert ((marched[both] - t[both]) >= -1e-9).all() and ((marched[both] - t[both]) <= step).all()
    assert (torch.isfinite(t) & torch.isinf(marched)).sum() <= 3  # only grazing rays with chords below a step


# ---------------------------------------------------------------------------------------------
# The synthetic generator and the CO3Dv2 reader
# ---------------------------------------------------------------------------------------------

def test_generated_layout_is_co3d_v2(synthetic_root):
    folder = synthetic_root / "hydrant"
    with gzip.open(folder / "frame_annotations.jgz", "rt") as f:
        frames = json.load(f)
    with gzip.open(folder / "sequence_annotations.jgz", "rt") as f:
        sequences = json.load(f)
    assert len(frames) == 2 * FRAMES and [s["category"] for s in sequences] == ["hydrant", "hydrant"]
    first = frames[0]
    assert set(first) >= {"sequence_name", "frame_number", "frame_timestamp", "image", "mask", "viewpoint", "meta"}
    assert first["image"]["size"] == [60, 80] and first["image"]["path"].startswith("hydrant/")
    assert set(first["viewpoint"]) == {"R", "T", "focal_length", "principal_point", "intrinsics_format"}
    formats = {f["sequence_name"]: f["viewpoint"]["intrinsics_format"] for f in frames}
    assert sorted(formats.values()) == ["ndc_isotropic", "ndc_norm_image_bounds"]
    assert (synthetic_root / first["mask"]["path"]).is_file() and first["mask"]["mass"] > 1
    dev = json.loads((folder / "set_lists" / "set_lists_fewview_dev.json").read_text())
    eval_name = sequence_name(3, "hydrant", 1)
    assert {s for s, _, _ in dev["test"]} == {eval_name}
    assert {s for s, _, _ in dev["train"]} == {sequence_name(3, "hydrant", 0)}


def test_render_synthetic_scene_in_memory():
    scene = render_synthetic_scene("teddybear", seed=5, n_views=3, image_hw=(48, 64), n_points=400)
    assert scene.images.shape == (3, 3, 48, 64) and scene.masks.shape == (3, 1, 48, 64)
    assert 0 <= scene.images.min() and scene.images.max() <= 1 and 0.02 < scene.masks.mean() < 0.6
    pixels = scene.cameras.transform_points_screen(scene.points)[..., :2].floor().long()
    assert (pixels >= 0).all() and (pixels[..., 0] < 64).all() and (pixels[..., 1] < 48).all()
    grown = F.max_pool2d(scene.masks, 3, stride=1, padding=1)  # within a pixel of the silhouette
    assert (grown[torch.arange(3)[:, None], 0, pixels[..., 1], pixels[..., 0]] > 0).all()
    again = render_synthetic_scene("teddybear", seed=5, n_views=3, image_hw=(48, 64), n_points=400)
    assert torch.equal(again.images, scene.images) and torch.equal(again.points, scene.points)
    other = render_synthetic_scene("teddybear", seed=6, n_views=3, image_hw=(48, 64), n_points=400)
    assert not torch.equal(other.images, scene.images)
    as_scene = scene.to_scene()
    assert torch.allclose(as_scene.images, scene.images * scene.masks) and as_scene.bbox.shape == (3, 4)


def test_generation_is_deterministic_for_any_number_of_workers(tmp_path):
    digests = []
    for run, workers in (("a", 1), ("b", 1), ("c", 2)):
        generate_dataset(tmp_path / run, ["ball", "vase"], scenes=2, frames=3, seed=7, image_sizes=[(24, 32)],
                         show_progress=False, workers=workers)
        files = sorted(p for p in (tmp_path / run).rglob("*") if p.is_file() and p.name != "synthetic_summary.json")
        digests.append([(str(p.relative_to(tmp_path / run)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files])
    assert digests[0] == digests[1] == digests[2]
    assert len(digests[0]) == 2 * (2 * 2 * 3 + 5)  # per category: images and masks, 3 set lists, 2 annotations


def test_round_trip_points_project_into_the_mask_in_every_view(synthetic_root):
    for subset, split in (("fewview_dev", "test"), ("fewview_train", "train")):
        dataset = load_dataset("synthetic", synthetic_root, list(CATEGORIES), subset=subset, split=split,
                               sample_batch_size=FRAMES)
        assert len(dataset) == 2
        for index in range(len(dataset)):
            scene = dataset[index]
            category = scene.category
            scene_index = 1 if split == "test" else 0
            assert scene.sequence_name == sequence_name(3, category, scene_index)
            n = len(scene)
            assert scene.images.shape == (n, 3, 256, 256) and scene.masks.shape == (n, 1, 256, 256)
            assert scene.frame_numbers.tolist() == list(range(FRAMES))
            assert torch.allclose(scene.images, scene.images_full * scene.masks)
            assert 0.03 < scene.masks.mean() < 0.8
            # the object's own surface points, from the same seed, land on the mask in every view, within
            # one pixel of the original image (the resolution the mask was rendered at)
            truth = synthetic_layout(category, scene_seed(3, category, scene_index), FRAMES, SIZES[scene_index], 300)
            assert torch.allclose(scene.cameras.R, truth.cameras.R.float()) and torch.allclose(scene.cameras.T, truth.cameras.T.float())
            screen = scene.cameras.transform_points_screen(truth.points.float())[..., :2]  # (N, P, 2) in 256 pixels
            assert (screen > 0).all() and (screen < 256).all()
            pixels = screen.floor().long()
            upscale = scene.cameras.focal_length[:, 0] * 128 / (truth.cameras.focal_length[:, 0] * min(SIZES[scene_index]) / 2)
            for view in range(n):
                window = 2 * int(torch.ceil(upscale[view])) + 1
                grown = F.max_pool2d(scene.masks[view], window, stride=1, padding=window // 2)[0]
                on_mask = grown[pixels[view, :, 1], pixels[view, :, 0]]
                assert (on_mask > 0).all(), f"{scene.sequence_name} view {view}: {(on_mask == 0).sum()} points off"
            assert (scene.valid_region[torch.arange(n)[:, None], 0, pixels[..., 1], pixels[..., 0]] == 1).all()


def test_reader_cameras_follow_upstreams_arithmetic(synthetic_root):
    """Recompute one frame's camera the way upstream's _get_pytorch3d_camera does, step by step."""
    dataset = load_dataset("synthetic", synthetic_root, "teddybear", sample_batch_size=FRAMES, image_size=64)
    scene = dataset[0]
    with gzip.open(synthetic_root / "teddybear" / "frame_annotations.jgz", "rt") as f:
        frame = [a for a in json.load(f) if a["sequence_name"] == scene.sequence_name][4]
    from sparsefusion.data.co3d import read_image  # the crop box comes from the mask, as the reader makes it
    height, width = frame["image"]["size"]
    mask = read_image(synthetic_root / frame["mask"]["path"], "L", (height, width), "mask")
    box = crop_box(foreground_box(mask), (height, width), 0.3)
    crop_h, crop_w = int(box[3] - box[1]), int(box[2] - box[0])
    scale = min(64 / crop_h, 64 / crop_w)
    half_wh = torch.tensor([width / 2, height / 2])
    viewpoint = frame["viewpoint"]
    rescale = half_wh if viewpoint["intrinsics_format"] == "ndc_norm_image_bounds" else half_wh.min()
    principal_px = half_wh - torch.tensor(viewpoint["principal_point"]) * rescale - box[:2]
    focal_px = torch.tensor(viewpoint["focal_length"]) * rescale
    expected_c = (32 - principal_px * scale) / 32
    expected_f = focal_px * scale / 32
    assert torch.allclose(scene.cameras.principal_point[4], expected_c, atol=1e-5)
    assert torch.allclose(scene.cameras.focal_length[4], expected_f, atol=1e-5)
    assert torch.allclose(scene.cameras.R[4], torch.tensor(viewpoint["R"]))


def test_frame_selection_follows_upstream(synthetic_root):
    # split 'test': sample_batch_size evenly spaced frames, repeating when there are fewer
    scene = load_dataset("synthetic", synthetic_root, "hydrant", sample_batch_size=32, image_size=32)[0]
    assert scene.frame_numbers.tolist() == torch.linspace(0, FRAMES - 1, 32).long().tolist()
    # fewview_test's test split takes every frame
    assert len(load_dataset("synthetic", synthetic_root, "hydrant", subset="fewview_test", image_size=32)[0]) == FRAMES
    # 'train': a random sample, in timestamp order
    train = load_dataset("synthetic", synthetic_root, "hydrant", subset="fewview_train", split="train",
                         sample_batch_size=5, image_size=32)
    picked = train.scene(0, generator=torch.Generator().manual_seed(1)).frame_numbers
    expected = sorted(torch.randperm(FRAMES, generator=torch.Generator().manual_seed(1))[:5].tolist())
    assert picked.tolist() == expected
    # sequences with fewer than min_frames frames are dropped (outside fewview_test)
    with pytest.raises(UserError, match="at least 13 frames"):
        load_dataset("synthetic", synthetic_root, "hydrant", min_frames=13)
    assert len(load_dataset("synthetic", synthetic_root, "hydrant", subset="fewview_test", min_frames=13)) == 1


def test_scene_dict_round_trip_and_toy_format(synthetic_root, tmp_path):
    scene = load_dataset("synthetic", synthetic_root, "hydrant", sample_batch_size=4)[0]
    data = scene.to_dict()
    assert {"R", "T", "f", "c", "image_size", "images", "masks", "valid_region", "bbox", "idx"} <= set(data)
    assert data["category"].shape == (4, 51) and data["category"][0, sorted(CO3D_ALL_CATEGORIES).index("hydrant")] == 1
    back = Scene.from_dict(data, "hydrant")
    assert back.sequence_name == scene.sequence_name and torch.equal(back.cameras.R, scene.cameras.R)
    assert torch.equal(back.frame_numbers, scene.frame_numbers) and back.frame_types == scene.frame_types

    save_toy(tmp_path, "hydrant", [scene, scene.select([3, 1])])
    toy = load_dataset("co3d_toy", tmp_path, "hydrant")
    assert len(toy) == 2 and len(toy[1]) == 2
    assert torch.equal(toy[0].images, scene.images) and torch.equal(toy[1].masks, scene.masks[[3, 1]])
    assert torch.equal(toy[0].cameras.focal_length, scene.cameras.focal_length)

    # a file holding only the keys upstream's demo reads: bbox and frame numbers are filled in
    minimal = {k: data[k] for k in ("R", "T", "f", "c", "image_size", "images", "masks", "valid_region")}
    toy_path(tmp_path, "apple").parent.mkdir()
    torch.save({"apple": [minimal]}, toy_path(tmp_path, "apple"))
    loaded = load_dataset("co3d_toy", tmp_path, "apple")[0]
    assert torch.allclose(loaded.bbox, scene.bbox) and loaded.frame_numbers.tolist() == [0, 1, 2, 3]
    assert loaded.sequence_name == "apple_000"
    moved = loaded.to(torch.float64)
    assert moved.images.dtype == torch.float64 and moved.frame_numbers.dtype == torch.long


def test_category_groups():
    assert len(CO3D_ALL_CATEGORIES) == 51 and len(set(CO3D_ALL_CATEGORIES)) == 51
    assert expand_categories("all_ten") == list(CO3D_ALL_TEN) and set(CO3D_ALL_TEN) <= set(CO3D_ALL_CATEGORIES)
    assert expand_categories(["hydrant", "all_ten"])[:2] == ["hydrant", "donut"]


def test_cli_writes_a_summary_and_rejects_bad_flags(tmp_path, capsys):
    main(["--root", str(tmp_path / "cli"), "--categories", "cake", "--scenes", "1", "--frames", "2",
          "--image-sizes", "20x24"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_frames"] == 2 and summary["categories"]["cake"]["image_sizes_hw"] == [[20, 24]]
    assert json.loads((tmp_path / "cli" / "synthetic_summary.json").read_text())["total_frames"] == 2
    for bad in (["--categories", "dragon"], ["--image-sizes", "20by24"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--root", str(tmp_path / "bad")] + bad)
        assert exit_info.value.code == 2
    assert "dragon" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the path and the expected layout
# ---------------------------------------------------------------------------------------------

def edit_frames(root, category, edit):
    path = root / category / "frame_annotations.jgz"
    with gzip.open(path, "rt") as f:
        frames = json.load(f)
    edit(frames)
    with gzip.open(path, "wt") as f:
        json.dump(frames, f)


def test_missing_root_category_subset_and_files(root_copy):
    with pytest.raises(UserError, match=r"dataset root not found: .*nowhere.*expected the CO3Dv2 layout"):
        load_dataset("co3d", root_copy / "nowhere", "hydrant")
    with pytest.raises(UserError, match=r"category folder not found: .*apple .*\['hydrant', 'teddybear'\]"):
        load_dataset("co3d", root_copy, "apple")
    with pytest.raises(UserError, match=r"no synthetic data for \[.apple.\].*python -m sparsefusion.data.synthetic"):
        load_dataset("synthetic", root_copy, "apple")
    with pytest.raises(UserError, match=r"set list not found: .*set_lists_manyview_dev.json .*set_lists_fewview_dev"):
        load_dataset("co3d", root_copy, "hydrant", subset="manyview_dev")
    (root_copy / "hydrant" / "sequence_annotations.jgz").unlink()
    with pytest.raises(UserError, match=r"sequence annotations not found: .*sequence_annotations.jgz.*layout"):
        load_dataset("co3d", root_copy, "hydrant")
    (root_copy / "teddybear" / "frame_annotations.jgz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"frame annotations .*frame_annotations.jgz is unreadable.*layout"):
        load_dataset("co3d", root_copy, "teddybear")


def test_malformed_annotations_and_missing_images(root_copy):
    edit_frames(root_copy, "hydrant", lambda frames: frames[2].pop("viewpoint"))
    with pytest.raises(UserError, match=r"frame_annotations.jgz: frame annotation 2 is malformed .*viewpoint"):
        load_dataset("co3d", root_copy, "hydrant")
    edit_frames(root_copy, "teddybear", lambda frames: frames[-1]["image"].update(size=[61, 80]))
    dataset = load_dataset("co3d", root_copy, "teddybear", image_size=32)
    with pytest.raises(UserError, match=r"mask .*frame000012.png is 90x60 \(HxW\) but its annotation says 61x80"):
        dataset[0]
    (root_copy / "teddybear" / "set_lists" / "set_lists_fewview_test.json").write_text("{broken")
    with pytest.raises(UserError, match=r"set list .*set_lists_fewview_test.json is unreadable"):
        load_dataset("co3d", root_copy, "teddybear", subset="fewview_test")
    name = sequence_name(3, "teddybear", 1)
    (root_copy / "teddybear" / name / "images" / "frame000003.jpg").unlink()
    dataset = load_dataset("co3d", root_copy, "teddybear", subset="fewview_dev", sample_batch_size=FRAMES, image_size=32)
    with pytest.raises(UserError, match=r"image not found: .*frame000003.jpg"):
        dataset[0]


@pytest.mark.parametrize("edit, message", [
    (lambda frame: frame["viewpoint"].update(focal_length=[float("nan"), 2.0]), "values that are NaN or infinite"),
    (lambda frame: frame["viewpoint"].update(focal_length=[0.0, 0.0]), "a focal length or image size that is not"),
    (lambda frame: frame["viewpoint"].update(R=[[0.0] * 3] * 3), "an R that is not a rotation"),
    (lambda frame: frame["viewpoint"].update(T=["a", 0.0, 1.0]), "frame annotation 15 has a viewpoint value that is"),
    (lambda frame: frame["mask"].update(mass="lots"), "frame annotation 15 is malformed"),
])
def test_unusable_cameras_are_named_by_frame_annotation(root_copy, edit, message):
    edit_frames(root_copy, "hydrant", lambda frames: edit(frames[15]))  # a frame of the evaluation scene
    with pytest.raises(UserError) as err:
        load_dataset("co3d", root_copy, "hydrant")
    assert message in str(err.value) and "frame_annotations.jgz" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    if "annotations [" in str(err.value):
        assert "frame annotations [15] have" in str(err.value)


def test_a_mask_of_one_pixel_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="1x1 pixels"):
        foreground_box(torch.zeros(1, 1, 1))
    assert foreground_box(torch.zeros(1, 1, 2)).tolist() == [0, 0, 2, 1]  # an empty mask: the whole image


def test_bad_names_splits_indices_and_toy_files(root_copy, tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'co3dv3'.*co3d_toy"):
        load_dataset("co3dv3", root_copy, "hydrant")
    with pytest.raises(UserError, match="split must be one of"):
        load_dataset("co3d", root_copy, "hydrant", split="eval")
    with pytest.raises(UserError, match="unknown dataset option"):
        load_dataset("co3d", root_copy, "hydrant", image_sise=128)
    with pytest.raises(UserError, match=r"no frames .* listed under 'val'"):
        load_dataset("co3d", root_copy, "hydrant", split="val")
    with pytest.raises(UserError, match=r"scene index 5 is out of range: 1 scenes"):
        load_dataset("co3d", root_copy, "hydrant")[5]

    with pytest.raises(UserError, match=r"toy file not found: .*hydrant_toy.pt .*expected upstream's toy layout"):
        load_dataset("co3d_toy", tmp_path, "hydrant")
    toy_path(tmp_path, "hydrant").parent.mkdir()
    torch.save({"apple": []}, toy_path(tmp_path, "hydrant"))
    with pytest.raises(UserError, match=r"must hold \{'hydrant': \[scene dicts\]\}, found \['apple'\]"):
        load_dataset("co3d_toy", tmp_path, "hydrant")
    torch.save({"hydrant": [{"R": torch.eye(3)[None]}]}, toy_path(tmp_path, "hydrant"))
    with pytest.raises(UserError, match=r"hydrant_toy.pt scene 0 lacks the keys \['T', 'f'"):
        load_dataset("co3d_toy", tmp_path, "hydrant")
    toy_path(tmp_path, "hydrant").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"toy dataset at .*hydrant_toy.pt could not be read"):
        load_dataset("co3d_toy", tmp_path, "hydrant")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracing_on_the_gpu_matches_the_cpu():
    cpu = render_synthetic_scene("hydrant", seed=4, n_views=3, image_hw=(48, 64))
    gpu = render_synthetic_scene("hydrant", seed=4, n_views=3, image_hw=(48, 64), device="cuda")
    # float32 tracing on either device: pixels differ only where a ray grazes an edge
    assert (gpu.images - cpu.images).abs().mean() < 1e-3 and (gpu.masks - cpu.masks).abs().mean() < 1e-3

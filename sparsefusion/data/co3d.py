"""CO3Dv2 in its on-disk format, read into Scenes as upstream's CO3Dv2Wrapper hands them out.

Layout (paths inside the annotations are relative to root):

    {root}/{category}/frame_annotations.jgz       gzipped JSON list of FrameAnnotation
    {root}/{category}/sequence_annotations.jgz    gzipped JSON list of SequenceAnnotation
    {root}/{category}/set_lists/set_lists_{subset}.json
        {"train" | "val" | "test": [[sequence_name, frame_number, image_path], ...]}

A FrameAnnotation holds sequence_name, frame_number, frame_timestamp, image {path, size (H, W)},
mask {path, mass} (a PNG of foreground probability × 255), viewpoint {R, T, focal_length,
principal_point, intrinsics_format}, meta {frame_type, ...}. R and T are in PyTorch3D's convention.

Selection, as upstream (which runs implicitron's JsonIndexDataset with its own frame picking): keep
frames whose mask mass is > 1 and whose image path the subset lists under the split; order them by
sequence name, then timestamp; drop sequences with fewer than min_frames frames (except for the
fewview_test subset's test split) and the two sequences upstream excludes. A scene is one sequence:
for split 'test' sample_batch_size frames evenly spaced (repeats when there are fewer; every frame
for fewview_test), else a random sample_batch_size of them, in timestamp order.
"""

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from sparsefusion.cameras import PerspectiveCameras, unusable_cameras
from sparsefusion.config import check_choice
from sparsefusion.data.categories import expand_categories
from sparsefusion.data.crop import (RESIZE_MODES, crop_and_resize, cropped_cameras, pixel_to_ndc_intrinsics,
                                    valid_region_box)
from sparsefusion.data.scene import Scene
from sparsefusion.errors import UserError, raise_problems

LAYOUT = (
    "expected the CO3Dv2 layout: {root}/{category}/frame_annotations.jgz, "
    "{root}/{category}/sequence_annotations.jgz, {root}/{category}/set_lists/set_lists_{subset}.json "
    "({\"train\"|\"val\"|\"test\": [[sequence_name, frame_number, image_path], ...]}), and the images "
    "and masks at the annotations' paths relative to {root}; get CO3Dv2 from github.com/facebookresearch/co3d"
)
SPLITS = ("train", "val", "test")
INTRINSICS_FORMATS = ("ndc_norm_image_bounds", "ndc_isotropic")


@dataclass
class CO3DConfig:
    """Where the data is and how scenes are cut from it (defaults: upstream's demo loader)."""

    root: str = "data/co3d"          # dataset root, one folder per category
    category: str = "hydrant"        # a category, a group ('all_ten', 'all') or a list; groups are pooled
    subset: str = "fewview_dev"      # set list: {root}/{category}/set_lists/set_lists_{subset}.json
    split: str = "test"              # 'train' | 'val' | 'test': the set list's part (upstream's 'stage')
    sample_batch_size: int = 32      # views per scene (train.py uses 10); fewview_test/test takes all
    image_size: int = 256            # side of the square output images
    box_crop_context: float = 0.3    # the crop box grows by this fraction of the foreground box
    mask_threshold: float = 0.4      # foreground probability threshold for the crop box
    min_frames: int = 11             # sequences with fewer selected frames are dropped (upstream: > 10)
    exclude_sequences: Tuple[str, ...] = ("411_55952_107659", "376_42884_85882")  # upstream drops these
    resize_mode: str = "upstream"    # "upstream" | "exact": the camera's scale after resizing (crop.py)


@dataclass
class Frame:
    """One frame's annotation, as read from frame_annotations.jgz."""

    category: str
    sequence_name: str
    frame_number: int
    timestamp: float
    image_path: str                 # relative to root
    image_hw: Tuple[int, int]       # (H, W) of the original image
    mask_path: str                  # relative to root
    mask_mass: Optional[float]      # soft pixel count of the mask
    R: list                         # 3x3, PyTorch3D convention
    T: list                         # 3
    focal_length: list              # 2, in intrinsics_format
    principal_point: list           # 2, in intrinsics_format
    intrinsics_format: str
    frame_type: Optional[str]


def viewpoint_to_pixels(focal_length, principal_point, image_hw, intrinsics_format):
    """Return (focal_px, principal_px) (..., 2) as (x, y) of a CO3D viewpoint's intrinsics.

    'ndc_norm_image_bounds' (legacy PyTorch3D NDC) spans [-1, 1] on both image axes;
    'ndc_isotropic' (PyTorch3D >= 0.5 NDC) spans [-1, 1] on the shorter side. Both have +x left and
    +y up, so principal_px = half_wh - principal_point · rescale and focal_px = focal_length · rescale.
    """
    half_wh = image_hw.flip(-1) / 2.0
    rescale = _intrinsics_rescale(half_wh, intrinsics_format)
    return focal_length * rescale, half_wh - principal_point * rescale


def pixels_to_viewpoint(focal_px, principal_px, image_hw, intrinsics_format):
    """Return (focal_length, principal_point) (..., 2) in intrinsics_format of pixel intrinsics."""
    half_wh = image_hw.flip(-1) / 2.0
    rescale = _intrinsics_rescale(half_wh, intrinsics_format)
    return focal_px / rescale, (half_wh - principal_px) / rescale


def _intrinsics_rescale(half_wh, intrinsics_format):
    if intrinsics_format == "ndc_norm_image_bounds":
        return half_wh
    if intrinsics_format == "ndc_isotropic":
        return half_wh.min(dim=-1, keepdim=True).values
    raise ValueError(f"unknown intrinsics_format {intrinsics_format!r}; expected one of {INTRINSICS_FORMATS}")


def read_jgz(path, what):
    """Return the JSON content of a gzipped JSON file; a missing or unreadable file raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; {LAYOUT}")
    try:
        with gzip.open(path, "rt", encoding="utf8") as f:
            return json.load(f)
    except (OSError, EOFError, ValueError) as err:
        raise UserError(f"{what} {path} is unreadable ({type(err).__name__}: {err}); "
                        f"it must be gzipped JSON; {LAYOUT}") from err


def read_set_list(path):
    """Return {split: [[sequence_name, frame_number, image_path], ...]} of a set-list file."""
    path = Path(path)
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("set_lists_*.json")) if path.parent.is_dir() else []
        raise UserError(f"set list not found: {path} (found: {available or 'none'}); {LAYOUT}")
    try:
        with open(path, encoding="utf8") as f:
            content = json.load(f)
        return {split: [(str(s), int(n), str(p)) for s, n, p in entries] for split, entries in content.items()}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"set list {path} is unreadable ({type(err).__name__}: {err}); "
                        f"{LAYOUT}") from err


def parse_frame(entry, category, path, index):
    """Return the Frame of one frame_annotations.jgz entry; a missing field raises UserError."""
    try:
        viewpoint, image, mask = entry["viewpoint"], entry["image"], entry["mask"]
        if viewpoint is None or mask is None:
            raise KeyError("viewpoint" if viewpoint is None else "mask")
        intrinsics_format = viewpoint.get("intrinsics_format") or "ndc_norm_image_bounds"
        if intrinsics_format not in INTRINSICS_FORMATS:
            raise ValueError(f"intrinsics_format {intrinsics_format!r} is not one of {INTRINSICS_FORMATS}")
        height, width = (int(v) for v in image["size"])
        return Frame(
            category=category, sequence_name=str(entry["sequence_name"]),
            frame_number=int(entry["frame_number"]), timestamp=float(entry.get("frame_timestamp") or 0.0),
            image_path=str(image["path"]), image_hw=(height, width),
            mask_path=str(mask["path"]), mask_mass=None if mask.get("mass") is None else float(mask["mass"]),
            R=viewpoint["R"], T=viewpoint["T"], focal_length=viewpoint["focal_length"],
            principal_point=viewpoint["principal_point"], intrinsics_format=intrinsics_format,
            frame_type=(entry.get("meta") or {}).get("frame_type"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: frame annotation {index} is malformed ({type(err).__name__}: {err}); "
                        f"each needs sequence_name, frame_number, image{{path, size}}, mask{{path, mass}}, "
                        f"viewpoint{{R, T, focal_length, principal_point, intrinsics_format}}") from err


def category_dir(root, category):
    """Return {root}/{category}, raising UserError naming what exists when root or the folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root not found: {root}; {LAYOUT}")
    folder = root / category
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if (p / "frame_annotations.jgz").is_file())
        raise UserError(f"category folder not found: {folder} (categories under {root}: {present or 'none'}); "
                        f"{LAYOUT}")
    return folder


def read_category(root, category, subset, split):
    """Return the Frames of one category that subset lists under split, with a known sequence."""
    folder = category_dir(root, category)
    frames_path = folder / "frame_annotations.jgz"
    sequences_path = folder / "sequence_annotations.jgz"
    entries = read_jgz(frames_path, "frame annotations")
    sequences = read_jgz(sequences_path, "sequence annotations")
    set_list = read_set_list(folder / "set_lists" / f"set_lists_{subset}.json")
    if not isinstance(entries, list) or not isinstance(sequences, list):
        raise UserError(f"{frames_path} and {sequences_path} must each hold a JSON list; {LAYOUT}")
    try:
        known_sequences = {str(s["sequence_name"]) for s in sequences}
    except (KeyError, TypeError) as err:
        raise UserError(f"{sequences_path}: every entry needs a sequence_name ({err}); {LAYOUT}") from err
    listed = {path for _, _, path in set_list.get(split, [])}
    frames, indices = [], []
    for index, entry in enumerate(entries):
        frame = parse_frame(entry, category, frames_path, index)
        if frame.mask_mass is None:
            raise UserError(f"{frames_path}: frame annotation {index} has no mask mass; it is needed to "
                            f"drop empty masks, as upstream")
        if frame.mask_mass > 1 and frame.image_path in listed and frame.sequence_name in known_sequences:
            frames.append(frame)
            indices.append(index)
    raise_problems(viewpoint_problems(frames, indices, frames_path))
    return frames


def viewpoint_problems(frames, indices, path):
    """Return one line per kind of unusable camera among frames, naming their annotation indices in the file at path."""
    if not frames:
        return []
    try:
        cameras = original_cameras(frames)
    except (TypeError, ValueError, RuntimeError):  # a value that is no number, or a list of the wrong length
        index = next(index for frame, index in zip(frames, indices) if not _converts(frame))
        return [f"{path}: frame annotation {index} has a viewpoint value that is not a number or not of its size "
                f"(R 3x3, T 3, focal_length 2, principal_point 2); fix or remove it"]
    return [f"{path}: frame annotations {[indices[i] for i in bad]} have {what}; fix or remove them"
            for what, bad in unusable_cameras(cameras).items()]


def _converts(frame):
    try:
        original_cameras([frame])
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


class CO3DDataset(torch.utils.data.Dataset):
    """Scenes (one per sequence) of CO3Dv2 categories; dataset[i] is a Scene."""

    def __init__(self, config: CO3DConfig):
        check_choice("split", config.split, SPLITS, UserError)
        check_choice("resize_mode", config.resize_mode, RESIZE_MODES, UserError)
        self.config = config
        self.categories = expand_categories(config.category)
        frames = [f for c in self.categories for f in read_category(config.root, c, config.subset, config.split)]
        if not frames:
            raise UserError(f"no frames with a non-empty mask are listed under '{config.split}' in "
                            f"set_lists_{config.subset}.json of {self.categories} in {config.root}")
        frames.sort(key=lambda f: (f.sequence_name, f.timestamp))
        by_sequence = {}
        for frame in frames:
            by_sequence.setdefault(frame.sequence_name, []).append(frame)
        keep_short = config.subset == "fewview_test" and config.split == "test"
        self.sequences = {
            name: seq for name, seq in by_sequence.items()
            if (keep_short or len(seq) >= config.min_frames) and name not in config.exclude_sequences
        }
        if not self.sequences:
            raise UserError(f"no sequence of {self.categories} in {config.root} has at least "
                            f"{config.min_frames} frames under '{config.split}' in set_lists_{config.subset}.json")
        self.sequence_names = list(self.sequences)

    def __len__(self):
        return len(self.sequence_names)

    def __getitem__(self, index):
        return self.scene(index)

    def frame_indices(self, n_frames, generator=None):
        """Return the indices (list) of the frames a scene of n_frames frames uses, as upstream."""
        config = self.config
        if config.split == "test" and config.subset == "fewview_test":
            return list(range(n_frames))
        if config.split == "test":
            return torch.linspace(0, n_frames - 1, config.sample_batch_size).long().tolist()
        return torch.randperm(n_frames, generator=generator)[:config.sample_batch_size].tolist()

    def scene(self, index, generator=None):
        """Return the Scene of sequence index; generator drives the random frame choice of 'train'/'val'."""
        if not -len(self) <= index < len(self):
            raise UserError(f"scene index {index} is out of range: {len(self)} scenes of {self.categories} "
                            f"in {self.config.root} ({self.config.subset}, {self.config.split})")
        name = self.sequence_names[index]
        sequence = self.sequences[name]
        picked = [sequence[i] for i in self.frame_indices(len(sequence), generator)]
        order = torch.argsort(torch.tensor([f.timestamp for f in picked]), stable=True).tolist()
        return self.load_scene([picked[i] for i in order])

    def load_scene(self, frames):
        """Return the Scene made of frames (one sequence), cropped and resized."""
        config = self.config
        loaded = [load_frame(config.root, f, config) for f in frames]
        images_full = torch.stack([item["image"] for item in loaded])
        masks = torch.stack([item["mask"] for item in loaded])
        valid_region = torch.stack([item["valid"] for item in loaded])
        cameras = cropped_cameras(
            original_cameras(frames),
            boxes=torch.stack([item["box"] for item in loaded]),
            scales=torch.stack([item["scale"] for item in loaded]),
            out_hw=(config.image_size, config.image_size),
        )
        return Scene(
            sequence_name=frames[0].sequence_name,
            category=frames[0].category,
            images=images_full * masks,
            masks=masks,
            valid_region=valid_region,
            cameras=cameras,
            bbox=torch.stack([valid_region_box(v) for v in valid_region]),
            frame_numbers=torch.tensor([f.frame_number for f in frames], dtype=torch.long),
            images_full=images_full,
            frame_types=[f.frame_type for f in frames],
        )


def original_cameras(frames):
    """Return the cameras (N) of frames in PyTorch3D NDC of their original image sizes (float32)."""
    image_hw = torch.tensor([f.image_hw for f in frames], dtype=torch.float32)
    focal_px, principal_px = [], []
    for frame, hw in zip(frames, image_hw):
        f_px, p_px = viewpoint_to_pixels(torch.tensor(frame.focal_length, dtype=torch.float32),
                                         torch.tensor(frame.principal_point, dtype=torch.float32),
                                         hw, frame.intrinsics_format)
        focal_px.append(f_px)
        principal_px.append(p_px)
    focal_length, principal_point = pixel_to_ndc_intrinsics(torch.stack(focal_px), torch.stack(principal_px), image_hw)
    return PerspectiveCameras(
        R=torch.tensor([f.R for f in frames], dtype=torch.float32),
        T=torch.tensor([f.T for f in frames], dtype=torch.float32),
        focal_length=focal_length, principal_point=principal_point, image_size=image_hw,
    )


def read_image(path, mode, expected_hw, what):
    """Return the image file at path as a float tensor (C, H, W) in [0, 1] (C = 3 for 'RGB', 1 for 'L')."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; {LAYOUT}")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert(mode), dtype=np.float32) / 255.0
    except OSError as err:
        raise UserError(f"{what} {path} is unreadable ({err})") from err
    if array.shape[:2] != tuple(expected_hw):
        raise UserError(f"{what} {path} is {array.shape[0]}x{array.shape[1]} (HxW) but its annotation says "
                        f"{expected_hw[0]}x{expected_hw[1]}")
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def load_frame(root, frame, config):
    """Return a frame cropped around its foreground and resized: crop.crop_and_resize's dict."""
    root = Path(root)
    mask = read_image(root / frame.mask_path, "L", frame.image_hw, "mask")
    image = read_image(root / frame.image_path, "RGB", frame.image_hw, "image")
    try:
        return crop_and_resize(image, mask, (config.image_size, config.image_size), config.box_crop_context,
                               config.mask_threshold, config.resize_mode)
    except ValueError as err:
        raise UserError(f"mask {root / frame.mask_path}: {err}") from err

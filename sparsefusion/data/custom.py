"""Your own scene: a folder of images whose cameras come from nerfstudio / instant-ngp, COLMAP or CO3D-style files.

    {root}/transforms.json                nerfstudio / instant-ngp (nerfstudio.py)        — or
    {root}/sparse/0/cameras.{bin,txt}     a COLMAP model (colmap.py; also sparse/, colmap/sparse/0, {root}) — or
    {root}/frame_annotations.jgz          CO3Dv2-style annotations (co3d.py): one scene per sequence
    {root}/images/                        the images (COLMAP's names are relative to it)
    {root}/masks/                         optional foreground masks, named as MASK_NAMES says

Each view is read, cut around its foreground and resized exactly as a CO3D frame (crop.py), its
camera converted exactly into ours (conventions.py) and the scene centred and scaled to CO3D's
scale (scene_scale.py). Without masks every pixel is foreground: the crop keeps the whole image,
masks equal the valid region, and Scene.has_masks is False (the demo then turns its silhouette
terms off).
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from sparsefusion.config import check_choice
from sparsefusion.data.co3d import parse_frame, read_image, read_jgz, viewpoint_to_pixels
from sparsefusion.data.colmap import find_model, read_colmap_views
from sparsefusion.data.conventions import opencv_from_ours
from sparsefusion.data.crop import RESIZE_MODES, crop_and_resize, cropped_cameras, valid_region_box
from sparsefusion.data.nerfstudio import read_transforms_views
from sparsefusion.data.scene import Scene
from sparsefusion.data.scene_scale import DEFAULT_DISTANCE, co3d_like_normalization, normalized_cameras
from sparsefusion.data.views import View, cameras_of_views, check_image_size, image_size, view_indices_by_name
from sparsefusion.errors import UserError

CAMERA_FORMATS = ("auto", "transforms", "colmap", "co3d")
NORMALIZE_MODES = ("auto", "cameras", "none")
# mask file names tried in {masks}/, in order, for an image {rel} = {stem}{suffix} relative to the image folder
MASK_NAMES = ("{rel}", "{stem}.png", "{rel}.png", "{stem}_mask.png", "{stem}.jpg", "{stem}.jpeg")
LAYOUT = ("a custom scene folder holds transforms.json (nerfstudio / instant-ngp), a COLMAP model (sparse/0/, "
          "sparse/ or the folder itself: cameras and images .bin or .txt) or frame_annotations.jgz (CO3D-style), "
          "the images, and optionally masks/ (docs/data.md, 'Your own scenes')")

_said = set()


def say_once(message):
    """Print 'warning: message' to stderr the first time this process sees it."""
    if message not in _said:
        _said.add(message)
        print(f"warning: {message}", file=sys.stderr)


@dataclass
class CustomOptions:
    """How a custom scene folder is read (demo.py: custom.<field>=value)."""

    cameras: str = "auto"            # 'transforms' | 'colmap' | 'co3d' | 'auto': the first found, in that order
    images: str = ""                 # image folder of COLMAP's names; '' = {root}/images if it exists, else {root}
    masks: str = ""                  # mask folder; '' = {root}/masks if it exists, else none (silhouette terms off)
    normalize: str = "auto"          # 'cameras': centre and scale by scene_scale.py's rule; 'none': poses as given;
                                     # 'auto': 'none' for CO3D-style annotations (CO3D's scale), else 'cameras'
    camera_distance: float = DEFAULT_DISTANCE  # the 'cameras' rule: mean camera distance from the centre
    max_views: int = 32              # views per scene, evenly spaced over the sorted names (0: every view)


@dataclass
class CustomConfig(CustomOptions):
    """Where a custom scene is and how it is cut (the crop defaults are CO3DConfig's)."""

    root: str = ""                   # the scene folder
    category: str = "hydrant"        # the label of its scenes (the demo takes the models of this category)
    image_size: int = 256            # side of the square output images
    box_crop_context: float = 0.3    # the crop box grows by this fraction of the foreground box
    mask_threshold: float = 0.4      # foreground probability threshold for the crop box
    resize_mode: str = "upstream"    # "upstream" | "exact": the camera's scale after resizing (crop.py)
    include: Tuple[str, ...] = ()    # image names kept among the views whatever max_views picks


def check_custom_options(options):
    """Raise UserError naming the first field of CustomOptions with a value that cannot work."""
    for name, allowed in (("cameras", CAMERA_FORMATS), ("normalize", NORMALIZE_MODES)):
        check_choice(f"custom.{name}", getattr(options, name), allowed, UserError)
    if not options.camera_distance > 0:
        raise UserError(f"custom.camera_distance must be positive, got {options.camera_distance}")
    if options.max_views < 0:
        raise UserError(f"custom.max_views must be 0 (every view) or more, got {options.max_views}")


def folder_option(root, value, default):
    """Return the folder a custom.images / custom.masks value names: as given, else under root; default if ''."""
    if not value:
        return root / default
    path = Path(value)
    return path if path.is_absolute() or path.exists() else root / value


def find_cameras(root, fmt="auto"):
    """Return (format, path) of the camera file of a scene folder: transforms.json, a COLMAP model folder, or
    frame_annotations.jgz ('auto' takes the first found); UserError if the asked one is absent."""
    found = {
        "transforms": root / "transforms.json" if (root / "transforms.json").is_file() else None,
        "colmap": find_model(root),
        "co3d": root / "frame_annotations.jgz" if (root / "frame_annotations.jgz").is_file() else None,
    }
    if fmt == "auto":
        for name, path in found.items():
            if path is not None:
                return name, path
        raise UserError(f"no camera file in {root}; {LAYOUT}")
    if found[fmt] is None:
        expected = {"transforms": "transforms.json", "colmap": "sparse/0/cameras.bin (or .txt; also sparse/ or the "
                    "folder itself)", "co3d": "frame_annotations.jgz"}[fmt]
        raise UserError(f"custom.cameras={fmt} but {root} has no {expected}; {LAYOUT}")
    return fmt, found[fmt]


def existing(*candidates):
    """Return the first of candidate paths that is a file, else None."""
    return next((path for path in candidates if path.is_file()), None)


def read_co3d_views(path, root):
    """Return the Views of CO3D-style frame annotations; paths are relative to root or, as in CO3D, its parent."""
    entries = read_jgz(path, "frame annotations")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} must hold a non-empty JSON list of CO3D frame annotations")
    views = []
    for index, entry in enumerate(entries):
        frame = parse_frame(entry, "", path, index)
        hw = torch.tensor(frame.image_hw, dtype=torch.float64)
        focal, principal = viewpoint_to_pixels(torch.tensor(frame.focal_length, dtype=torch.float64),
                                               torch.tensor(frame.principal_point, dtype=torch.float64),
                                               hw, frame.intrinsics_format)
        R_cv, t = opencv_from_ours(torch.tensor(frame.R, dtype=torch.float64), torch.tensor(frame.T, dtype=torch.float64))
        image = existing(root / frame.image_path, root.parent / frame.image_path) or root / frame.image_path
        views.append(View(
            name=frame.image_path, image_path=image, R_cv=R_cv, t_cv=t, focal_px=focal, principal_px=principal,
            image_hw=frame.image_hw, where=f"{path} frame annotation {index} ({frame.image_path})",
            mask_path=existing(root / frame.mask_path, root.parent / frame.mask_path),
            frame_number=frame.frame_number, sequence=frame.sequence_name))
    return views


def read_views(root, fmt, image_dir):
    """Return (format, camera file, Views) of a scene folder."""
    fmt, path = find_cameras(root, fmt)
    if fmt == "transforms":
        return fmt, path, read_transforms_views(path, warn=say_once)
    if fmt == "colmap":
        return fmt, path, read_colmap_views(path, image_dir, warn=say_once)
    return fmt, path, read_co3d_views(path, root)


def mask_candidates(view, image_dir, mask_dir):
    """Return the mask paths tried for a view, in order: the camera file's, then MASK_NAMES under mask_dir."""
    try:
        rel = view.image_path.relative_to(image_dir)
    except ValueError:
        rel = Path(view.image_path.name)
    stem = rel.with_suffix("").as_posix()
    tried = [view.mask_path] if view.mask_path is not None else []
    if mask_dir is not None:
        tried += [mask_dir / pattern.format(rel=rel.as_posix(), stem=stem) for pattern in MASK_NAMES]
    return tried


def read_mask(path, image_hw, where):
    """Return a mask file as (1, H, W) foreground probability: 8-bit grey / 255, a 0/1 label image as it is,
    or the alpha channel of a cut-out (a transparent RGBA file)."""
    if image_size(path, where)[1]:
        return read_image(path, "RGBA", image_hw, f"{where}: mask")[3:]
    mask = read_image(path, "L", image_hw, f"{where}: mask")
    if 0 < mask.max() <= 1.0 / 255 + 1e-6:  # values 0 and 1: a label image, not a grey one
        mask = (mask > 0).to(mask.dtype)
    return mask


def view_subset(n_views, max_views, required=()):
    """Return sorted view indices: linspace(0, n − 1, max_views) floored, as CO3D's 'test', plus required ones.

    Every view when max_views is 0 or at least n_views.
    """
    if max_views == 0 or max_views >= n_views:
        return list(range(n_views))
    picked = set(torch.linspace(0, n_views - 1, max_views).long().tolist()) | set(required)
    return sorted(picked)


class CustomDataset(torch.utils.data.Dataset):
    """The scene(s) of one custom folder: one, or one per sequence of CO3D-style annotations; dataset[i] is a Scene."""

    def __init__(self, config: CustomConfig):
        check_custom_options(config)
        check_choice("resize_mode", config.resize_mode, RESIZE_MODES, UserError)
        self.config = config
        root = Path(config.root)
        if not root.is_dir():
            raise UserError(f"custom scene folder not found: {root}; {LAYOUT}")
        self.image_dir = folder_option(root, config.images, "images")
        if not self.image_dir.is_dir():
            if config.images:
                raise UserError(f"custom.images folder not found: {self.image_dir}")
            self.image_dir = root
        self.mask_dir = folder_option(root, config.masks, "masks")
        if not self.mask_dir.is_dir():
            if config.masks:
                raise UserError(f"custom.masks folder not found: {self.mask_dir}; "
                                f"leave custom.masks empty to run without masks")
            self.mask_dir = None
        self.format, self.camera_file, views = read_views(root, config.cameras, self.image_dir)
        self.sequences = {}
        for view in views:
            self.sequences.setdefault(view.sequence or root.resolve().name, []).append(view)
        self.sequence_names = sorted(self.sequences)
        self.normalize = config.normalize if config.normalize != "auto" else ("none" if self.format == "co3d"
                                                                              else "cameras")
        self.normalizations = {name: self.normalization(name) for name in self.sequence_names}

    def __len__(self):
        return len(self.sequence_names)

    def __getitem__(self, index):
        return self.scene(index)

    def normalization(self, name):
        """Return {'centre': (3,) float64, 'scale': float} of a sequence: X' = (X − centre) · scale."""
        if self.normalize == "none":
            return {"centre": torch.zeros(3, dtype=torch.float64), "scale": 1.0}
        where = f"{self.camera_file} ({name})" if len(self.sequences) > 1 else str(self.camera_file)
        centre, scale = co3d_like_normalization(cameras_of_views(self.sequences[name]),
                                                self.config.camera_distance, where)
        return {"centre": centre, "scale": scale}

    def view_indices(self, index):
        """Return the indices of the views scene index uses: custom.max_views evenly spaced, plus those config.include names."""
        if not -len(self) <= index < len(self):
            raise UserError(f"scene index {index} is out of range: {self.config.root} holds {len(self)} scene(s)")
        views = self.sequences[self.sequence_names[index]]
        required = view_indices_by_name([v.name for v in views], self.config.include, str(self.camera_file)) \
            if self.config.include else []
        return view_subset(len(views), self.config.max_views, required)

    def mask_sources(self, views):
        """Return each view's mask: a path, 'alpha' (a transparent image's alpha channel) or None; all or none have one."""
        sources, missing = [], []
        for view in views:
            transparent = check_image_size(view)
            tried = mask_candidates(view, self.image_dir, self.mask_dir)
            path = existing(*tried)
            if view.mask_path is not None and not view.mask_path.is_file():
                raise UserError(f"{view.where}: its mask {view.mask_path} is missing")
            sources.append(path if path is not None else ("alpha" if transparent else None))
            if sources[-1] is None:
                missing.append((view, tried))
        if missing and (len(missing) < len(views) or self.mask_dir is not None):
            view, tried = missing[0]
            names = ", ".join(p.name for p in tried) or "none"
            raise UserError(f"{view.where}: no mask for {view.image_path.name} (tried {names} in "
                            f"{self.mask_dir}); give every view a mask, or none")
        return sources

    def scene(self, index):
        """Return the Scene of sequence index: its views cut around the foreground, cameras normalised."""
        config = self.config
        picked = self.view_indices(index)
        name = self.sequence_names[index]
        views = [self.sequences[name][i] for i in picked]
        sources = self.mask_sources(views)
        loaded = []
        for view, source in zip(views, sources):
            rgba = read_image(view.image_path, "RGBA" if source == "alpha" else "RGB", view.image_hw, view.where)
            image, mask = rgba[:3], rgba[3:] if source == "alpha" else None
            if isinstance(source, Path):
                mask = read_mask(source, view.image_hw, view.where)
            if mask is None:
                mask = torch.ones_like(image[:1])
            try:
                loaded.append(crop_and_resize(image, mask, (config.image_size, config.image_size),
                                              config.box_crop_context, config.mask_threshold, config.resize_mode))
            except ValueError as err:
                raise UserError(f"{view.where}: mask {source}: {err}") from err
        normalization = self.normalizations[name]
        cameras = normalized_cameras(cameras_of_views(views), normalization["centre"], normalization["scale"])
        cameras = cropped_cameras(cameras, boxes=torch.stack([item["box"] for item in loaded]),
                                  scales=torch.stack([item["scale"] for item in loaded]),
                                  out_hw=(config.image_size, config.image_size)).to(torch.float32)
        images_full = torch.stack([item["image"] for item in loaded])
        masks = torch.stack([item["mask"] for item in loaded])
        valid_region = torch.stack([item["valid"] for item in loaded])
        return Scene(
            sequence_name=name, category=config.category, images=images_full * masks, masks=masks,
            valid_region=valid_region, cameras=cameras,
            bbox=torch.stack([valid_region_box(v) for v in valid_region]),
            frame_numbers=torch.tensor([v.frame_number if v.frame_number is not None else i
                                        for i, v in zip(picked, views)], dtype=torch.long),
            images_full=images_full, frame_names=[v.name for v in views], has_masks=sources[0] is not None)

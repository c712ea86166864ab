"""A scene: one object's views, masks and cameras, as every dataset hands them to the pipeline."""

from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from sparsefusion.cameras import PerspectiveCameras
from sparsefusion.data.categories import CO3D_ALL_CATEGORIES
from sparsefusion.data.crop import valid_region_box
from sparsefusion.errors import UserError

# keys of upstream's per-scene dict that every scene needs (demo.py reads exactly these)
REQUIRED_KEYS = ("R", "T", "f", "c", "image_size", "images", "masks", "valid_region")


@dataclass
class Scene:
    """N views of one sequence; images are square (256 × 256 for CO3D) and cameras in PyTorch3D NDC."""

    sequence_name: str                # the sequence's name (upstream's 'idx')
    category: str                     # the object category, e.g. "hydrant"
    images: torch.Tensor              # (N, 3, H, W) in [0, 1]: RGB × foreground probability (upstream's 'images')
    masks: torch.Tensor               # (N, 1, H, W) foreground probability in [0, 1]
    valid_region: torch.Tensor        # (N, 1, H, W) 1 where the pixel shows the original image, 0 on padding
    cameras: PerspectiveCameras       # (N) cameras of the cropped and resized images
    bbox: torch.Tensor                # (N, 4) valid region's [min_y, min_x, max_y, max_x] in [-1, 1] (upstream's 'bbox')
    frame_numbers: torch.Tensor       # (N,) long: each view's frame number in its sequence
    images_full: Optional[torch.Tensor] = None  # (N, 3, H, W) RGB in [0, 1] without masking, where known
    frame_types: Optional[List[str]] = None     # (N) CO3D frame types, e.g. "test_known", where known
    frame_names: Optional[List[str]] = None     # (N) image names as the camera file gives them (custom scenes)
    has_masks: bool = True                      # False: no foreground masks were given, masks = valid region

    def __len__(self):
        return self.images.shape[0]

    def to(self, *args, **kwargs):
        """Return the scene with its tensors and cameras moved/cast like Tensor.to (frame_numbers stay long)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "frame_numbers":
                value = value.to(device=_device_of(args, kwargs, value))
            elif isinstance(value, (torch.Tensor, PerspectiveCameras)):
                value = value.to(*args, **kwargs)
            moved[f.name] = value
        return Scene(**moved)

    def select(self, index):
        """Return the scene restricted to the views index (a list or long tensor), in that order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index.to(value.device)]
            elif isinstance(value, PerspectiveCameras):
                value = value[index.to(value.device)]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            picked[f.name] = value
        return Scene(**picked)

    def to_dict(self):
        """Return upstream's per-scene dict (CO3Dv2Wrapper with masked=False): R, T, f, c, image_size, ...

        'category' is upstream's one-hot (N, 51) over the sorted CO3D categories (all zero for a
        category outside CO3D); 'idx' is the sequence name.
        """
        n = len(self)
        data = {
            "R": self.cameras.R, "T": self.cameras.T,
            "f": self.cameras.focal_length, "c": self.cameras.principal_point,
            "image_size": self.cameras.image_size,
            "images": self.images, "masks": self.masks,
            "valid_region": self.valid_region, "mask_crop": self.valid_region,
            "bbox": self.bbox, "idx": self.sequence_name,
            "category": category_one_hot(self.category, n, self.images.device),
            "frame_number": self.frame_numbers,
        }
        if self.images_full is not None:
            data["images_full"] = self.images_full
        if self.frame_types is not None:
            data["frame_type"] = list(self.frame_types)
        return data

    @classmethod
    def from_dict(cls, data, category, sequence_name=None, where="scene dict"):
        """Return the Scene of an upstream per-scene dict; a missing key raises UserError naming where.

        Keys beyond REQUIRED_KEYS are optional: 'bbox' is recomputed from 'valid_region', 'idx'
        gives the sequence name (else sequence_name), 'frame_number' the frame numbers (else 0..N-1).
        """
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise UserError(f"{where} lacks the keys {missing}; a scene dict needs {list(REQUIRED_KEYS)} "
                            f"(upstream CO3Dv2Wrapper's output with masked=False)")
        images = _tensor(data["images"], where, "images")
        n = images.shape[0]
        valid_region = _tensor(data["valid_region"], where, "valid_region")
        bbox = data.get("bbox")
        if bbox is None:
            bbox = torch.stack([valid_region_box(v) for v in valid_region])
        try:
            cameras = PerspectiveCameras(
                R=_tensor(data["R"], where, "R"), T=_tensor(data["T"], where, "T"),
                focal_length=_tensor(data["f"], where, "f"), principal_point=_tensor(data["c"], where, "c"),
                image_size=_tensor(data["image_size"], where, "image_size").to(data["R"].dtype),
            )
        except ValueError as err:  # mis-shaped camera tensors
            raise UserError(f"{where}: {err}") from err
        name = data.get("idx", sequence_name)
        frame_numbers = data.get("frame_number")
        frame_types = data.get("frame_type")
        return cls(
            sequence_name=str(name if name is not None else ""),
            category=category,
            images=images,
            masks=_tensor(data["masks"], where, "masks"),
            valid_region=valid_region,
            cameras=cameras,
            bbox=torch.as_tensor(bbox),
            frame_numbers=torch.arange(n) if frame_numbers is None else torch.as_tensor(frame_numbers).long(),
            images_full=data.get("images_full"),
            frame_types=list(frame_types) if isinstance(frame_types, (list, tuple)) else None,
        )


def category_one_hot(category, n, device=None):
    """Return upstream's (n, 51) one-hot of category over the alphabetically sorted CO3D categories."""
    names = sorted(CO3D_ALL_CATEGORIES)
    one_hot = torch.zeros(n, len(names), device=device)
    if category in names:
        one_hot[:, names.index(category)] = 1.0
    return one_hot


def _tensor(value, where, key):
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{where}: '{key}' must be a tensor, got {type(value).__name__}")
    return value


def _device_of(args, kwargs, value):
    if "device" in kwargs:
        return kwargs["device"]
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            return arg
    return value.device

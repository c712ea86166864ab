"""A posed view: one image with its camera, the record every camera-file reader of a custom scene returns."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image

from sparsefusion.data.conventions import cameras_from_opencv
from sparsefusion.errors import UserError


@dataclass
class View:
    """One image and its camera in OpenCV's convention with pixel intrinsics, as a camera file gives it."""

    name: str                        # the image as the camera file names it (what input_names matches)
    image_path: Path                 # where the image is
    R_cv: torch.Tensor               # (3, 3) float64 world-to-camera rotation (OpenCV: +X right, +Y down, +Z forward)
    t_cv: torch.Tensor               # (3,) float64 world-to-camera translation
    focal_px: torch.Tensor           # (2,) float64 (fx, fy) in pixels
    principal_px: torch.Tensor       # (2,) float64 (cx, cy) in pixels, image spanning [0, W] × [0, H]
    image_hw: Tuple[int, int]        # (H, W) of the image the camera was made for
    where: str                       # the camera file's entry, for messages: "transforms.json frame 3"
    mask_path: Optional[Path] = None  # a mask the camera file names (nerfstudio's mask_path, CO3D's mask)
    frame_number: Optional[int] = None  # the frame's number where the camera file has one (CO3D)
    sequence: str = ""               # the sequence the frame belongs to where the file has several (CO3D)


def image_size(path, where):
    """Return ((H, W), transparent) of an image file; UserError naming where if missing or unreadable.

    transparent: the image has an alpha channel that is not opaque everywhere (a cut-out).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: image not found: {path}; camera files name images relative to the scene "
                        f"folder (transforms.json), its images/ folder (COLMAP) or the dataset root (CO3D)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            transparent = "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255
            return (height, width), transparent
    except OSError as err:
        raise UserError(f"{where}: image {path} is unreadable ({err})") from err


def check_image_size(view):
    """Return whether view's image is transparent (image_size) after checking its size against the camera's."""
    actual, transparent = image_size(view.image_path, view.where)
    if tuple(actual) != tuple(view.image_hw):
        raise UserError(f"{view.where}: image {view.image_path} is {actual[1]}x{actual[0]} (WxH) but its camera "
                        f"is for {view.image_hw[1]}x{view.image_hw[0]}; use the images the cameras were made for "
                        f"(not a downscaled copy)")
    return transparent


def cameras_of_views(views: List[View]):
    """Return our PerspectiveCameras (N) of views, float64, in NDC of their own image sizes."""
    return cameras_from_opencv(
        torch.stack([v.R_cv for v in views]).double(), torch.stack([v.t_cv for v in views]).double(),
        torch.stack([v.focal_px for v in views]).double(), torch.stack([v.principal_px for v in views]).double(),
        torch.tensor([v.image_hw for v in views], dtype=torch.float64))


def view_indices_by_name(names, wanted, where="the scene"):
    """Return the indices (list) of the views named by wanted: each an exact name, else a file name, else a stem.

    Args:
        names: (N) the views' names (paths as the camera file gives them).
        wanted: the requested names.
    """
    indices = []
    for request in wanted:
        request = request.strip()
        for key in (lambda n: n, lambda n: Path(n).name, lambda n: Path(n).stem):
            matches = [i for i, name in enumerate(names) if key(name) == request]
            if matches:
                break
        if not matches:
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            raise UserError(f"{where} has no view named {request!r}; its views: {shown}")
        if len(matches) > 1:
            raise UserError(f"{where}: {request!r} names several views ({', '.join(names[i] for i in matches)}); "
                            f"give the full name")
        indices.append(matches[0])
    return indices

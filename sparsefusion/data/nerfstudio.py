"""nerfstudio's and instant-ngp's transforms.json read into posed Views.

    {
      "camera_model": "OPENCV",                  optional; pinhole models only (fisheye, equirectangular refused)
      "fl_x", "fl_y", "cx", "cy", "w", "h",      intrinsics in pixels, shared by the frames ...
      "camera_angle_x", "camera_angle_y",        ... or instant-ngp's fields of view (radians) instead of fl_x, fl_y
      "k1", "k2", "k3", "k4", "p1", "p2",        distortion: ignored, with a warning when non-zero
      "frames": [{"file_path": "images/frame_00001.png",
                  "transform_matrix": [[...], [...], [...], [0, 0, 0, 1]],   camera-to-world, OpenGL axes
                  "mask_path": "masks/frame_00001.png",                      optional
                  "fl_x": ..., ...}]                                         per-frame intrinsics override shared ones
    }

Paths are relative to the file's folder; a file_path without extension (NeRF-synthetic's "./train/r_0")
gets .png, .jpg or .jpeg, whichever exists. Missing w, h are the image's size; missing cx, cy its
centre; a missing fl_y is fl_x (or comes from camera_angle_y).
"""

import json
import math
import sys
from pathlib import Path

import torch

from sparsefusion.data.conventions import opencv_from_opengl, rotation_error
from sparsefusion.data.views import View, image_size
from sparsefusion.errors import UserError

PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "PERSPECTIVE")
INTRINSIC_KEYS = ("camera_model", "fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y",
                  "k1", "k2", "k3", "k4", "p1", "p2", "is_fisheye")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def read_json(path):
    """Return the content of a JSON file; UserError naming it if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        with open(path, encoding="utf8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err


def resolve_image(folder, file_path):
    """Return the image path of a frame's file_path relative to folder (absolute kept; a missing extension added)."""
    path = Path(file_path) if Path(file_path).is_absolute() else Path(folder) / file_path
    if path.suffix or path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    return path


def pinhole_from_values(values, image_hw, where):
    """Return (focal_px (2,), principal_px (2,)) float64 of merged transforms.json intrinsics for image_hw = (H, W)."""
    height, width = image_hw
    try:
        if values.get("fl_x") is not None:
            fx = float(values["fl_x"])
        elif values.get("camera_angle_x") is not None:
            fx = width / (2 * math.tan(float(values["camera_angle_x"]) / 2))
        else:
            raise UserError(f"{where}: no focal length; give fl_x (pixels) or camera_angle_x (radians), "
                            f"shared or per frame")
        if values.get("fl_y") is not None:
            fy = float(values["fl_y"])
        elif values.get("camera_angle_y") is not None:
            fy = height / (2 * math.tan(float(values["camera_angle_y"]) / 2))
        else:
            fy = fx
        cx = float(values["cx"]) if values.get("cx") is not None else width / 2
        cy = float(values["cy"]) if values.get("cy") is not None else height / 2
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: intrinsics must be numbers ({err})") from err
    if not (fx > 0 and fy > 0 and all(map(math.isfinite, (fx, fy, cx, cy)))):
        raise UserError(f"{where}: focal lengths must be positive and finite, got fl_x={fx}, fl_y={fy}")
    return torch.tensor([fx, fy], dtype=torch.float64), torch.tensor([cx, cy], dtype=torch.float64)


def check_model(values, where):
    """Raise UserError unless the merged intrinsics describe a pinhole camera."""
    model = values.get("camera_model")
    if values.get("is_fisheye") or (model is not None and str(model).upper() not in PINHOLE_MODELS):
        name = "fisheye (is_fisheye)" if values.get("is_fisheye") else model
        raise UserError(f"{where}: camera model {name} is not supported; supported: {', '.join(PINHOLE_MODELS)}; "
                        f"undistort the images to a pinhole camera first (e.g. ns-process-data with COLMAP)")


def pose_of(frame, where):
    """Return (R_cv (3, 3), t (3,)) float64, OpenCV world-to-camera, of a frame's OpenGL transform_matrix."""
    if "transform_matrix" not in frame:
        raise UserError(f"{where} has no transform_matrix (camera-to-world pose); every frame needs one — "
                        f"drop the frames the capture could not pose")
    try:
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: transform_matrix must be a 4x4 (or 3x4) list of numbers ({err})") from err
    if tuple(c2w.shape) not in ((4, 4), (3, 4)) or not torch.isfinite(c2w).all():
        raise UserError(f"{where}: transform_matrix must be a finite 4x4 (or 3x4) matrix, got shape {tuple(c2w.shape)}")
    error = float(rotation_error(c2w[:3, :3]))
    if error > 1e-3:
        raise UserError(f"{where}: the rotation part of transform_matrix is not a rotation (error {error:.2g}); "
                        f"scaled or mirrored poses are not supported")
    return opencv_from_opengl(c2w)


def read_transforms_views(path, warn=None):
    """Return the Views (sorted by name) of a transforms.json; warn(message) once if any distortion is non-zero."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    path = Path(path)
    content = read_json(path)
    frames = content.get("frames") if isinstance(content, dict) else None
    if not isinstance(frames, list) or not frames:
        raise UserError(f"{path}: expected an object with a non-empty 'frames' list (nerfstudio / instant-ngp "
                        f"transforms.json)")
    shared = {key: content[key] for key in INTRINSIC_KEYS if key in content}
    views, distorted = [], []
    for index, frame in enumerate(frames):
        where = f"{path} frame {index}"
        if not isinstance(frame, dict) or "file_path" not in frame:
            raise UserError(f"{where} has no file_path; every frame needs file_path and transform_matrix")
        where = f"{path} frame {index} ({frame['file_path']})"
        values = {**shared, **{key: frame[key] for key in INTRINSIC_KEYS if key in frame}}
        check_model(values, where)
        R_cv, t = pose_of(frame, where)
        image_path = resolve_image(path.parent, frame["file_path"])
        if values.get("w") is not None and values.get("h") is not None:
            try:
                image_hw = (int(values["h"]), int(values["w"]))
            except (TypeError, ValueError) as err:
                raise UserError(f"{where}: w and h must be whole numbers of pixels ({err})") from err
        else:
            image_hw, _ = image_size(image_path, where)
        focal, principal = pinhole_from_values(values, image_hw, where)
        if any(float(values.get(key) or 0.0) != 0.0 for key in DISTORTION_KEYS):
            distorted.append(index)
        mask = frame.get("mask_path")
        views.append(View(
            name=Path(frame["file_path"]).as_posix().removeprefix("./"), image_path=image_path, R_cv=R_cv, t_cv=t,
            focal_px=focal, principal_px=principal, image_hw=image_hw, where=where,
            mask_path=None if mask is None else (Path(mask) if Path(mask).is_absolute() else path.parent / mask)))
    if distorted:
        warn(f"{path}: lens distortion (k1..k4, p1, p2) of {len(distorted)} frame(s) is ignored (pinhole only); "
             f"undistort the images first for exact results")
    return sorted(views, key=lambda v: v.name)

"""COLMAP sparse models (cameras and images, text or binary) read into posed Views, as COLMAP documents them.

colmap.github.io/format.html:

  cameras.txt   CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]            (lines starting with # are comments)
  images.txt    IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME     then a line of POINTS2D[] (may be empty)
  cameras.bin   uint64 count; per camera: int32 id, int32 model_id, uint64 width, uint64 height, float64 params[]
  images.bin    uint64 count; per image: uint32 id, float64 qvec[4], float64 tvec[3], uint32 camera_id,
                NAME as NUL-terminated bytes, uint64 n_points2D, n_points2D × (float64 x, float64 y, int64 id)

All little-endian. The pose is world-to-camera in OpenCV's convention; NAME is the image's path
relative to the image folder. points3D is not needed: the reconstruction uses the poses only.
Pinhole models are read, their distortion ignored with a warning (undistort first for exact
results: `colmap image_undistorter`); the fisheye and other models are refused.
"""

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from sparsefusion.data.conventions import rotation_from_quaternion
from sparsefusion.data.views import View
from sparsefusion.errors import UserError

# model name -> (model id, parameter names): the models whose projection is a pinhole plus distortion
PINHOLE_MODELS = {
    "SIMPLE_PINHOLE": (0, ("f", "cx", "cy")),
    "PINHOLE": (1, ("fx", "fy", "cx", "cy")),
    "SIMPLE_RADIAL": (2, ("f", "cx", "cy", "k")),
    "RADIAL": (3, ("f", "cx", "cy", "k1", "k2")),
    "OPENCV": (4, ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2")),
}
OTHER_MODELS = {5: "OPENCV_FISHEYE", 6: "FULL_OPENCV", 7: "FOV", 8: "SIMPLE_RADIAL_FISHEYE", 9: "RADIAL_FISHEYE",
                10: "THIN_PRISM_FISHEYE", 11: "RAD_TAN_THIN_PRISM_FISHEYE"}
MODEL_NAMES = {model_id: name for name, (model_id, _) in PINHOLE_MODELS.items()} | OTHER_MODELS
MODEL_FIX = (f"supported camera models: {', '.join(PINHOLE_MODELS)}; undistort the images to PINHOLE first "
             f"(`colmap image_undistorter`)")


@dataclass
class ColmapCamera:
    """One entry of cameras.txt/bin."""

    camera_id: int
    model: str                   # e.g. "PINHOLE"
    width: int
    height: int
    params: Tuple[float, ...]    # as the model defines them


@dataclass
class ColmapImage:
    """One entry of images.txt/bin."""

    image_id: int
    qvec: Tuple[float, ...]      # (qw, qx, qy, qz) world-to-camera rotation
    tvec: Tuple[float, ...]      # world-to-camera translation
    camera_id: int
    name: str                    # path relative to the image folder


def find_model(folder):
    """Return the COLMAP model folder of a scene: the first of sparse/0, sparse, colmap/sparse/0, the folder itself
    holding cameras.{bin,txt}; None when there is none."""
    folder = Path(folder)
    for candidate in (folder / "sparse" / "0", folder / "sparse", folder / "colmap" / "sparse" / "0", folder):
        if (candidate / "cameras.bin").is_file() or (candidate / "cameras.txt").is_file():
            return candidate
    return None


def model_files(model_dir):
    """Return (cameras path, images path) of a model folder, binary first as COLMAP reads; UserError if one is missing."""
    model_dir = Path(model_dir)
    for ext in (".bin", ".txt"):
        cameras, images = model_dir / f"cameras{ext}", model_dir / f"images{ext}"
        if cameras.is_file():
            if not images.is_file():
                raise UserError(f"COLMAP model {model_dir}: {cameras.name} is there but {images.name} is missing; "
                                f"a model needs cameras{ext} and images{ext} (export the model again)")
            return cameras, images
    raise UserError(f"COLMAP model {model_dir}: no cameras.bin or cameras.txt")


def read_model(model_dir):
    """Return ({camera_id: ColmapCamera}, [ColmapImage]) of a COLMAP model folder, text or binary."""
    cameras_path, images_path = model_files(model_dir)
    if cameras_path.suffix == ".bin":
        return read_cameras_binary(cameras_path), read_images_binary(images_path)
    return read_cameras_text(cameras_path), read_images_text(images_path)


def _content_lines(path):
    """Yield (line number, stripped line) of a text file, comments dropped (empty lines kept)."""
    with open(path, encoding="utf8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line.startswith("#"):
                yield number, line


def read_cameras_text(path):
    """Return {camera_id: ColmapCamera} of a cameras.txt."""
    cameras = {}
    for number, line in _content_lines(path):
        if not line:
            continue
        parts = line.split()
        try:
            camera = ColmapCamera(int(parts[0]), parts[1], int(parts[2]), int(parts[3]),
                                  tuple(float(v) for v in parts[4:]))
        except (IndexError, ValueError) as err:
            raise UserError(f"{path} line {number}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[], "
                            f"got {line!r} ({err})") from err
        check_camera(camera, f"{path} line {number}")
        cameras[camera.camera_id] = camera
    return cameras


def read_images_text(path):
    """Return [ColmapImage] of an images.txt (each image takes two lines; the second lists its 2D points)."""
    images = []
    lines = iter(_content_lines(path))
    for number, line in lines:
        if not line:
            continue
        parts = line.split()
        try:
            images.append(ColmapImage(int(parts[0]), tuple(float(v) for v in parts[1:5]),
                                      tuple(float(v) for v in parts[5:8]), int(parts[8]), " ".join(parts[9:])))
            if not images[-1].name:
                raise ValueError("no NAME")
        except (IndexError, ValueError) as err:
            raise UserError(f"{path} line {number}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, "
                            f"got {line!r} ({err})") from err
        next(lines, None)  # POINTS2D[]: not needed
    return images


class _Reader:
    """Little-endian struct reads from a bytes buffer; a short buffer raises UserError naming the file."""

    def __init__(self, path):
        self.path, self.data, self.offset = path, Path(path).read_bytes(), 0

    def read(self, fmt):
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise UserError(f"{self.path} is truncated at byte {self.offset} (or is not a COLMAP binary model); "
                            f"export the model again")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values

    def read_name(self):
        end = self.data.find(b"\x00", self.offset)
        if end < 0:
            raise UserError(f"{self.path} is truncated in an image name at byte {self.offset}; export the model again")
        name = self.data[self.offset:end].decode("utf8")
        self.offset = end + 1
        return name


def read_cameras_binary(path):
    """Return {camera_id: ColmapCamera} of a cameras.bin."""
    reader = _Reader(path)
    cameras = {}
    (count,) = reader.read("Q")
    for index in range(count):
        camera_id, model_id, width, height = reader.read("iiQQ")
        if model_id not in MODEL_NAMES or model_id in OTHER_MODELS:
            name = OTHER_MODELS.get(model_id, f"id {model_id}")
            raise UserError(f"{path} camera {camera_id}: camera model {name} is not supported; {MODEL_FIX}")
        model = MODEL_NAMES[model_id]
        params = reader.read("d" * len(PINHOLE_MODELS[model][1]))
        cameras[camera_id] = ColmapCamera(camera_id, model, width, height, params)
    return cameras


def read_images_binary(path):
    """Return [ColmapImage] of an images.bin."""
    reader = _Reader(path)
    images = []
    (count,) = reader.read("Q")
    for _ in range(count):
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = reader.read("IdddddddI")
        name = reader.read_name()
        (n_points,) = reader.read("Q")
        reader.read("ddq" * n_points)
        images.append(ColmapImage(image_id, (qw, qx, qy, qz), (tx, ty, tz), camera_id, name))
    return images


def check_camera(camera, where):
    """Raise UserError unless camera is a supported model with its number of parameters."""
    if camera.model not in PINHOLE_MODELS:
        raise UserError(f"{where}: camera model {camera.model} is not supported; {MODEL_FIX}")
    expected = PINHOLE_MODELS[camera.model][1]
    if len(camera.params) != len(expected):
        raise UserError(f"{where}: a {camera.model} camera has {len(expected)} parameters "
                        f"({' '.join(expected)}), got {len(camera.params)}")


def pinhole_intrinsics(camera):
    """Return (focal_px (2,), principal_px (2,), distortion {name: value}) of a ColmapCamera, float64."""
    values = dict(zip(PINHOLE_MODELS[camera.model][1], camera.params))
    fx = values.get("fx", values.get("f"))
    fy = values.get("fy", values.get("f"))
    distortion = {k: v for k, v in values.items() if k not in ("f", "fx", "fy", "cx", "cy")}
    return (torch.tensor([fx, fy], dtype=torch.float64), torch.tensor([values["cx"], values["cy"]], dtype=torch.float64),
            distortion)


def read_colmap_views(model_dir, image_dir, warn=None):
    """Return the Views (sorted by name) of a COLMAP model; image names are relative to image_dir.

    warn(message) is called once if any camera has non-zero distortion (default: print to stderr).
    """
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    cameras, images = read_model(model_dir)
    cameras_path, images_path = model_files(model_dir)
    if not images:
        raise UserError(f"{images_path} lists no images; SparseFusion needs posed images")
    views, distorted = [], []
    for image in sorted(images, key=lambda im: im.name):
        where = f"{images_path} image {image.image_id} ({image.name})"
        if image.camera_id not in cameras:
            raise UserError(f"{where}: camera {image.camera_id} is not in {cameras_path} "
                            f"(cameras there: {sorted(cameras)})")
        camera = cameras[image.camera_id]
        check_camera(camera, f"{cameras_path} camera {camera.camera_id}")
        focal, principal, distortion = pinhole_intrinsics(camera)
        if any(value != 0 for value in distortion.values()):
            distorted.append(camera.camera_id)
        views.append(View(
            name=image.name, image_path=Path(image_dir) / image.name,
            R_cv=rotation_from_quaternion(torch.tensor(image.qvec, dtype=torch.float64)),
            t_cv=torch.tensor(image.tvec, dtype=torch.float64),
            focal_px=focal, principal_px=principal, image_hw=(camera.height, camera.width), where=where))
    if distorted:
        warn(f"{cameras_path}: lens distortion of camera(s) {sorted(set(distorted))} is ignored (pinhole only); "
             f"undistort the images first (`colmap image_undistorter`) for exact results")
    return views


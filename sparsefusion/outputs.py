"""What runs leave on disk: images, GIFs, loss plots, JSON — each written whole or not at all (atomic_files.py).

Images here are numpy arrays (H, W, 3) float in [0, 1] or uint8; panels are laid side by side.
"""

import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from sparsefusion.atomic_files import atomic_path


def to_uint8(image):
    """Return image (H, W, C) as uint8, scaling floats in [0, 1] (clipped) to [0, 255]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def side_by_side(images, labels=None):
    """Return one (H, ΣW, 3) uint8 image of equally tall panels; single-channel panels become grey.

    labels: one caption per panel, written on a LABEL_HEIGHT-pixel strip above it (the image grows by it).
    """
    panels = [_as_rgb(to_uint8(image)) for image in images]
    if labels is not None:
        panels = [np.vstack([label_strip(text, panel.shape[1]), panel]) for text, panel in zip(labels, panels)]
    return np.hstack(panels)


LABEL_HEIGHT = 12


def label_strip(text, width):
    """Return a (LABEL_HEIGHT, width, 3) uint8 strip: white text on black, cut at the right edge."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, LABEL_HEIGHT))
    ImageDraw.Draw(strip).text((2, 0), text, fill=(255, 255, 255))
    return np.asarray(strip)


def _as_rgb(image):
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def image_grid(images, per_row):
    """Return a uint8 grid of equally sized images, per_row to a row; a short last row is padded black."""
    images = [to_uint8(image) for image in images]
    blank = np.zeros_like(images[0])
    rows = []
    for start in range(0, len(images), per_row):
        row = images[start:start + per_row]
        rows.append(np.hstack(row + [blank] * (per_row - len(row))))
    return np.vstack(rows)


def write_image(image, path, quality=95):
    """Write an image (H, W, C) to path (.png or .jpg) atomically; returns the path."""
    with atomic_path(path) as tmp:
        options = {"quality": quality} if Path(path).suffix.lower() in (".jpg", ".jpeg") else {}
        imageio.imwrite(tmp, to_uint8(image), **options)
    return Path(path)


def write_gif(frames, path, seconds_per_frame=0.2):
    """Write frames (a list of (H, W, 3) images) as a looping GIF atomically; returns the path."""
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, [to_uint8(frame) for frame in frames], format="GIF",
                        duration=seconds_per_frame * 1000, loop=0)
    return Path(path)


def write_json(data, path):
    """Write data as indented strict JSON atomically, NaN and infinities as null; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_or_null(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)


def finite_or_null(data):
    """Return data (dicts, lists, scalars) with every non-finite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


def write_text(text, path):
    """Write text atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def plot_losses(curves, path, title=None, x=None, xlabel="iteration", log_scale=False):
    """Plot named loss curves {name: [values]} against x (default 0, 1, ...) into an image file atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        if len(values):
            axes.plot(np.arange(len(values)) if x is None else x[:len(values)], values, linewidth=1, label=name)
    if log_scale:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.legend(loc="upper right")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".").replace("jpg", "jpeg"))
    plt.close(figure)
    return Path(path)

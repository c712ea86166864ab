"""The README's pictures of a demo run: input views, novel views (ground truth | EFT | ours), turntable frames.

    python benchmarks/readme_images.py output/mini_demo hydrant_000_c2 docs/images/mini_hydrant
writes {prefix}_inputs.png, {prefix}_views.png and {prefix}_turntable.png, each enlarged ×2 (nearest).
"""

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.outputs import write_image

SCALE = 2
VIEW_FRAMES = (0, 8, 16, 24)       # frames of the scene GIF shown
TURNTABLE_FRAMES = 8               # evenly spaced frames of the turntable GIF
PANELS = 3                         # of the scene GIF's five panels: ground truth | EFT | ours (not the masks)


def enlarged(image):
    return np.repeat(np.repeat(image, SCALE, axis=0), SCALE, axis=1)


def read(path):
    if not path.is_file():
        raise UserError(f"{path} is missing: run the demo first (python demo.py --mini)")
    return iio.imread(path, index=None) if path.suffix == ".gif" else iio.imread(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the demo's output folder")
    parser.add_argument("label", help="the scene's label, e.g. hydrant_000_c2")
    parser.add_argument("prefix", help="output path prefix")
    args = parser.parse_args()
    run = Path(args.run)
    scene = read(run / "render_gifs" / f"{args.label}.gif")[..., :3]
    turntable = read(run / "render_gifs" / f"{args.label}_circle.gif")[..., :3]
    width = scene.shape[2] // 5
    views = np.concatenate([scene[i % len(scene), :, :PANELS * width] for i in VIEW_FRAMES], axis=0)
    picked = np.linspace(0, len(turntable) - 1, TURNTABLE_FRAMES).round().astype(int)
    spin = np.concatenate([turntable[i, :, :turntable.shape[2] // 2] for i in picked], axis=1)  # renders, not masks
    inputs = read(run / "log" / f"{args.label}_inputs.jpg")
    for name, image in (("inputs", inputs), ("views", views), ("turntable", spin)):
        write_image(enlarged(image).astype(np.float32) / 255.0, Path(f"{args.prefix}_{name}.png"))
        print(f"{args.prefix}_{name}.png")


if __name__ == "__main__":
    with exit_on_user_error():
        main()

"""Time the data stage: synthetic generation, CO3D-format scene loading (crop + resize), host-to-device copy.

    python benchmarks/bench_data.py --out bench_data.json              # full size, on cuda if present
    python benchmarks/bench_data.py --device cpu --small --out bench_data_cpu.json

Loading is CPU work (JPEG/PNG decoding, crop, resize), so its numbers describe the host; the copy
of a 32-view 256² scene to the device is timed with synchronisation. Also checks that the 'exact'
and 'upstream' resize modes give the same images and masks differing only at nearest-neighbour
boundaries, and cameras within a small relative difference.
"""

import argparse
import tempfile
import time

import torch

from sparsefusion.data import load_dataset
from sparsefusion.data.synthetic import generate_dataset
from measures import median_seconds, relative_error, timed, write_results


def main():
    """Run the timings, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()

    frames, sizes, views = (12, [(60, 80), (90, 60)], 12) if args.small else (32, [(150, 200), (240, 160)], 32)
    repeats = 2 if args.small else 5
    results = {"device": args.device, "small": args.small, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        generate_dataset(root, ["hydrant", "teddybear"], scenes=2, frames=frames, seed=0, image_sizes=sizes,
                         show_progress=False)
        generation = time.perf_counter() - start
        results["generate_frames_per_s"] = 2 * 2 * frames / generation

        scenes = {}
        for mode in ("upstream", "exact"):
            dataset = load_dataset("synthetic", root, "hydrant", sample_batch_size=views, resize_mode=mode)
            seconds, scenes[mode] = timed(lambda: dataset[0], "cpu", repeats)
            results[f"load_scene_s_{mode}"] = seconds
        up, ex = scenes["upstream"], scenes["exact"]
        results["resize_modes_image_max_abs_diff"] = float((up.images_full - ex.images_full).abs().max())
        results["resize_modes_mask_fraction_differing"] = float((up.masks != ex.masks).float().mean())
        results["resize_modes_focal_rel_err"] = relative_error(up.cameras.focal_length, ex.cameras.focal_length)
        results["to_device_s"] = median_seconds(lambda: up.to(args.device), args.device, repeats)

    write_results(results, args.out)


if __name__ == "__main__":
    main()

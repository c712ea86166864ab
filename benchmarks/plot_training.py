"""Loss curves of training runs side by side, from the log/losses.csv files train.py writes.

One panel per --panel, each a title and curves `label=path/to/losses.csv:column`:

    python benchmarks/plot_training.py --out docs/images/mini_training.png \
        --panel "stage 1: VAE (L1 per pixel)" "L1=runs/vae/log/losses.csv:reconstruction" \
        --panel "stage 2: EFT + VLDM" "total=runs/joint/log/losses.csv:total" "diffusion=...:diffusion"
"""

import argparse
import csv
from pathlib import Path

from sparsefusion.errors import UserError, exit_on_user_error
from sparsefusion.outputs import atomic_path


def read_curve(spec):
    """Return (label, steps, values) of 'label=path:column'."""
    label, _, source = spec.partition("=")
    path, _, column = source.rpartition(":")
    if not (label and path and column):
        raise UserError(f"a curve is label=path/losses.csv:column, got {spec!r}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise UserError(f"{path} has no column {column!r} (columns: {list(rows[0]) if rows else 'none'})")
    return label, [int(row["step"]) for row in rows], [float(row[column]) for row in rows]


def plot(panels, out):
    """Draw panels [(title, [curve specs])] side by side, log-scaled losses, into out atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, specs) in zip(axes[0], panels):
        for label, steps, values in map(read_curve, specs):
            ax.plot(steps, values, linewidth=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.legend(loc="upper right")
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format=Path(out).suffix.lstrip("."), dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--panel", nargs="+", action="append", required=True, metavar=("TITLE", "CURVE"),
                        help="a panel's title, then its curves label=path/losses.csv:column")
    parser.add_argument("--out", required=True, help="image file (.png)")
    args = parser.parse_args()
    plot([(panel[0], panel[1:]) for panel in args.panel], args.out)
    print(args.out)


if __name__ == "__main__":
    with exit_on_user_error():
        main()

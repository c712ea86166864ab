"""Time one demo.py scene at full size: upstream's models (random weights), 3000 iterations, 256² images.

    python benchmarks/bench_demo.py --unet graph --out bench_demo.json

Random weights make the pictures meaningless but not the timings: every network has its released
size and every stage runs as with the released checkpoints. Needs ImageNet VGG16 weights for the
perceptual term (or SPARSEFUSION_VGG16 pointing at any VGG16 state dict).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from sparsefusion.external.autoencoder_kl import AutoencoderKL  # noqa: E402
from sparsefusion.data.synthetic import main as generate_synthetic  # noqa: E402
from sparsefusion.eft import EFTConfig, EpipolarFeatureTransformer, save_eft  # noqa: E402
from sparsefusion.vae import save_vae  # noqa: E402
from sparsefusion.vldm import VLDM, save_vldm  # noqa: E402


def full_size_checkpoints(folder):
    """Write random full-size EFT, VLDM and VAE checkpoints into folder; return their paths."""
    torch.manual_seed(0)
    save_eft(EpipolarFeatureTransformer(EFTConfig(backbone_weights="random")), folder / "eft.pt")
    vldm = VLDM()
    torch.nn.init.normal_(vldm.unet.final_conv.weight, std=1e-3)  # zero-initialised: keep ε̂ non-trivial
    save_vldm(vldm, folder / "vldm.pt")
    save_vae(AutoencoderKL(), folder / "vae.ckpt")
    return folder / "eft.pt", folder / "vldm.pt", folder / "vae.ckpt"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--unet", default="graph", choices=("eager", "compile", "graph"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--extra", default="", help="further demo.py flags, space-separated")
    parser.add_argument("--out", required=True, help="JSON file for the results; demo outputs go beside it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    eft, vldm, vae = full_size_checkpoints(work)
    generate_synthetic(["--root", str(work / "data"), "--categories", "hydrant", "--scenes", "1"])
    out_dir = Path(args.out).with_suffix("")
    flags = ["-d", "synthetic", "-r", str(work / "data"), "-c", "hydrant", "-e", str(eft), "-l", str(vldm),
             "-a", str(vae), "-o", str(out_dir), "--iterations", str(args.iterations), "--unet", args.unet,
             "--precision", args.precision, *args.extra.split()]
    start = time.perf_counter()
    demo.main(flags)
    total = time.perf_counter() - start
    record = json.loads(next((out_dir / "metrics").glob("*.json")).read_text())
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "iterations": args.iterations, "unet": args.unet,
              "precision": args.precision, "extra": args.extra, "timings_s": record["timings"],
              "scene_total_s": total}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

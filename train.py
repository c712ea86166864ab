"""Train SparseFusion's EFT and VLDM jointly for one category, under DDP; a rerun resumes where it stopped.

With stage=vae it trains an AutoencoderKL on the dataset's images instead (the mini models' first stage).

    python train.py -c hydrant                                  # one GPU, CO3Dv2 under data/co3d
    python train.py -c hydrant -g 8 -r /datasets/co3d            # eight GPUs
    python train.py -c hydrant --config my.yaml vis_itr=500 precision=bf16
    torchrun --nproc_per_node 8 --nnodes 2 ... train.py -c hydrant   # several machines
    python train.py -c hydrant -d synthetic --config configs/train_small.yaml   # CPU smoke run
    python train.py --config configs/mini_train.yaml stage=vae     # the mini recipe: the VAE, then stage=joint

Settings, lowest priority first: TrainConfig's defaults (upstream's), the --config YAML, the flags,
then key=value overrides (nested ones as eft.n_layers=2). Outputs and checkpoints go to exp_dir,
output/sparsefusion_exp/demo_train/{category}_{stage} by default (see docs/training.md).
"""

import argparse
import sys

from sparsefusion.config import field_help
from sparsefusion.data import DATASET_NAMES
from sparsefusion.errors import exit_on_user_error
from sparsefusion.training import BACKENDS, TrainConfig, load_config

# flag -> TrainConfig field
FLAG_FIELDS = ("gpus", "port", "dataset", "root", "category", "vae", "backend")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="every TrainConfig field (key=value), with its default:\n"
                                            + "\n".join(field_help(TrainConfig)))
    parser.add_argument("-g", "--gpus", type=int, help="processes (GPUs) on this machine (default: 1)")
    parser.add_argument("-p", "--port", type=int, help="last digit of the DDP port 1234p (default: 1)")
    parser.add_argument("-d", "--dataset", choices=DATASET_NAMES, help="dataset (default: co3d)")
    parser.add_argument("-r", "--root", help="dataset root (default: data/{dataset})")
    parser.add_argument("-c", "--category", help="CO3D category to train (required unless the config sets it)")
    parser.add_argument("-a", "--vae", help="VAE checkpoint (default: checkpoints/sd/sd-v1-3-vae.ckpt)")
    parser.add_argument("-b", "--backend", choices=BACKENDS, help="torch.distributed backend (default: auto, "
                                                                  "nccl on GPU and gloo on CPU)")
    parser.add_argument("--config", help="YAML file of TrainConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields, e.g. iterations=1000")
    return parser.parse_args(argv)


def config_from_args(args):
    """Return the TrainConfig of parsed arguments."""
    flags = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    return load_config(args.config, args.overrides, **flags)


def main(argv=None):
    args = parse_args(argv)
    with exit_on_user_error():
        config = config_from_args(args)
        from sparsefusion.trainer import run_training  # after parsing: --help needs none of it

        try:
            run_training(config)
        except KeyboardInterrupt:  # outside the training loop, which stops on its own after saving
            print(f"interrupted: {config.exp_dir} keeps its latest checkpoint (a run stopped while training saves one "
                  f"first); the same command resumes from it", file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    main()

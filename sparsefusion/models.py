"""The three released models of a category, loaded for inference: EFT, VLDM and Stable Diffusion's VAE."""

from pathlib import Path

import torch

from sparsefusion.distill import Models
from sparsefusion.eft import load_eft
from sparsefusion.errors import UserError
from sparsefusion.fast_unet import FastPathConfig, fast_unet
from sparsefusion.perceptual import build_lpips
from sparsefusion.vae import load_latent_codec
from sparsefusion.vldm import VLDM

DEFAULT_CHECKPOINTS = {
    "eft": "checkpoints/sf/{category}/ckpt_latest_eft.pt",
    "vldm": "checkpoints/sf/{category}/ckpt_latest.pt",
    "vae": "checkpoints/sd/sd-v1-3-vae.ckpt",
}
WHERE_TO_GET = {
    "eft": "the SparseFusion weights folder linked in the upstream README (Google Drive), as checkpoints/sf/{category}/",
    "vldm": "the SparseFusion weights folder linked in the upstream README (Google Drive), as checkpoints/sf/{category}/",
    "vae": "huggingface.co/CompVis/stable-diffusion-v-1-3-original: sd-v1-3.ckpt renamed to checkpoints/sd/sd-v1-3-vae.ckpt",
}
FLAGS = {"eft": "-e/--eft", "vldm": "-l/--vldm", "vae": "-a/--vae"}


def checkpoint_paths(category, args):
    """Return {'eft', 'vldm', 'vae'} -> Path, from the flags or the default locations."""
    given = {"eft": args.eft, "vldm": args.vldm, "vae": args.vae}
    return {name: Path(given[name] or DEFAULT_CHECKPOINTS[name].format(category=category)) for name in given}


def check_checkpoints(category, args):
    """Raise UserError naming the first checkpoint that is missing and where to get it."""
    for name, path in checkpoint_paths(category, args).items():
        if not path.is_file():
            raise UserError(f"{name.upper()} checkpoint not found at {path}; get it from "
                            f"{WHERE_TO_GET[name].format(category=category)} (or pass {FLAGS[name]})")


UNET_PATHS = {  # --unet: how the distillation evaluates the UNet on CUDA (benchmarks/bench_vldm.py, docs/vldm.md)
    "eager": None,                                                    # fp32 module, upstream's numerics: 23.6 ms
    "graph": FastPathConfig(compile_mode="none"),                     # bf16, channels_last, CUDA graph: 5.8 ms
    "compile": FastPathConfig(compile_mode="default"),                # the same through torch.compile: 3.3 ms
}


def unet_callable(vldm, mode, device):
    """Return the UNet callable for the samplers per UNET_PATHS, or None (the module itself) on the CPU."""
    config = UNET_PATHS[mode]
    if config is None or device.type != "cuda":
        return None
    return fast_unet(vldm.unet, config)


def load_models(category, args, device):
    """Return the Models of a category on device, from the checkpoint flags or default paths."""
    check_checkpoints(category, args)
    paths = checkpoint_paths(category, args)
    eft = load_eft(paths["eft"]).to(device)
    vldm = VLDM.from_checkpoint(paths["vldm"]).to(device).eval().requires_grad_(False)
    codec = load_latent_codec(paths["vae"], device=device)  # fp32: bf16 is no faster at batch 1 (docs/vae.md)
    return Models(eft=eft.requires_grad_(False), codec=codec, vldm=vldm,
                  unet=unet_callable(vldm, args.unet, torch.device(device)),
                  lpips=build_lpips("vgg", backbone=args.vgg_weights, device=device))

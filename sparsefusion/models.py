"""The three models a reconstruction uses, loaded for inference: EFT, VLDM and VAE.

By default upstream's released weights of a category and Stable Diffusion's VAE; the mini models that
ship in checkpoints/mini/ (docs/mini.md) load the same way, their architecture stored in the files.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from sparsefusion.checkpoint import file_problem
from sparsefusion.eft import load_eft
from sparsefusion.errors import UserError, raise_problems
from sparsefusion.fast_unet import FastPathConfig, PaddedBatches, fast_unet
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
MINI_FOLDER = Path("checkpoints/mini")
MINI_FIX = "the mini models ship with the repository: restore them with `git checkout -- checkpoints/mini`"
QUICK_START = "no weights at hand? `python demo.py --mini` reconstructs with the mini models that ship with the repository"


@dataclass
class Models:
    """The frozen models a distillation uses: building the bundle takes their parameters out of autograd."""

    eft: torch.nn.Module             # EpipolarFeatureTransformer
    codec: torch.nn.Module           # LatentCodec: images in [0, 1] <-> scaled latents
    vldm: torch.nn.Module            # VLDM, for denoise()
    unet: Optional[Callable] = None  # a fast callable of the VLDM's UNet (fast_model()); None = eager
    lpips: Optional[torch.nn.Module] = None  # LPIPS(vgg) for the perceptual term; None = term off

    def __post_init__(self):
        # the distillation differentiates through LPIPS into the NeRF: its weights must not collect gradients
        for model in (self.eft, self.codec, self.vldm, self.lpips):
            if model is not None:
                model.requires_grad_(False)

    @property
    def latent_stride(self):
        """Pixels per latent: the VAE's downsampling factor (8 for SD's, 4 for the mini one)."""
        return self.codec.vae.downsampling_factor

    @property
    def image_size(self):
        """The image side the models work at: the VLDM's latent size times the VAE's stride."""
        return self.vldm.config.image_size * self.latent_stride


def checkpoint_paths(category, config):
    """Return {'eft', 'vldm', 'vae'} -> Path, from a DemoConfig's fields or the default locations."""
    given = {"eft": config.eft, "vldm": config.vldm, "vae": config.vae}
    return {name: Path(given[name] or DEFAULT_CHECKPOINTS[name].format(category=category)) for name in given}


def is_mini(path):
    return Path(path).resolve().parent == MINI_FOLDER.resolve()


def checkpoint_problems(category, config):
    """Return one line for each of a category's checkpoints that is missing or a folder, naming how to get it."""
    problems = []
    for name, path in checkpoint_paths(category, config).items():
        problem = file_problem(path, f"{name.upper()} checkpoint")
        if problem is None or path.is_dir():
            problems += [problem] if problem else []
        elif is_mini(path):
            problems.append(f"{problem}; {MINI_FIX}")
        else:
            where = WHERE_TO_GET[name].format(category=category)
            problems.append(f"{problem}; get it from {where} (or pass {FLAGS[name]}); {QUICK_START}")
    return problems


def check_checkpoints(category, config):
    """Raise one UserError naming every checkpoint of a category that is missing, and how to get it."""
    raise_problems(checkpoint_problems(category, config))


UNET_PATHS = {  # --unet: how the distillation evaluates the UNet on CUDA (benchmarks/bench_vldm.py, docs/vldm.md)
    "eager": None,                                                    # fp32 module, upstream's numerics: 23.6 ms
    "graph": FastPathConfig(compile_mode="none"),                     # bf16, channels_last, CUDA graph: 5.8 ms
    "compile": FastPathConfig(compile_mode="default"),                # the same through torch.compile: 3.3 ms
}


def unet_callable(vldm, mode, device, max_batch=None):
    """Return the UNet callable for the samplers per UNET_PATHS, or None (the module itself) on the CPU.

    max_batch: for batches that vary up to it (several scenes at once), the fast path runs at a few padded
    sizes only (fast_unet.PaddedBatches); None for a fixed batch.
    """
    config = UNET_PATHS[mode]
    if config is None or device.type != "cuda":
        return None
    model = fast_unet(vldm.unet, config)
    return model if max_batch is None else PaddedBatches(model, max_batch)


def _load(loader, path):
    """Return loader(path); a file that cannot be loaded names its fix (mini files: restore from git)."""
    try:
        return loader(path)
    except UserError as err:
        fix = MINI_FIX if is_mini(path) else "replace it with the released file"
        raise UserError(f"{err}; {fix}") from err


def check_compatible(models, paths):
    """Raise UserError if the three models were not trained together (feature widths, latent channels)."""
    unet = models.vldm.config.unet
    if models.eft.config.hidden_dim != unet.cond_images_channels:
        raise UserError(f"the EFT at {paths['eft']} makes {models.eft.config.hidden_dim}-channel features but the "
                        f"VLDM at {paths['vldm']} takes {unet.cond_images_channels}: use checkpoints trained together")
    if models.codec.vae.config.embed_dim != unet.channels:
        raise UserError(f"the VAE at {paths['vae']} makes {models.codec.vae.config.embed_dim}-channel latents but the "
                        f"VLDM at {paths['vldm']} denoises {unet.channels}: use checkpoints trained together")


def load_checkpoints(category, config, device):
    """Return the Models of a category's three checkpoints on device, checked to fit together (no fast UNet, no LPIPS)."""
    check_checkpoints(category, config)
    paths = checkpoint_paths(category, config)
    eft = _load(load_eft, paths["eft"]).to(device)
    vldm = _load(VLDM.from_checkpoint, paths["vldm"]).to(device).eval()
    vldm.config = replace(vldm.config, high_noise=config.high_noise,  # sampling choices, not the architecture
                          plms_steps=config.plms_steps or vldm.config.plms_steps)
    # fp32: bf16 is no faster at batch 1 (docs/vae.md)
    codec = _load(lambda path: load_latent_codec(path, device=device), paths["vae"])
    models = Models(eft=eft, codec=codec, vldm=vldm)
    check_compatible(models, paths)
    return models


def load_models(category, config, device):
    """Return the Models of a category on device, from a DemoConfig's checkpoint fields or the default paths."""
    models = load_checkpoints(category, config, device)
    varying = config.scenes_at_once * config.distill.views_per_step if config.scenes_at_once > 1 else None
    return replace(models, unet=unet_callable(models.vldm, config.unet, torch.device(device), varying),
                   lpips=build_lpips("vgg", backbone=config.vgg_weights or None, device=device))

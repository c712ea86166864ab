"""Fast evaluation of the VLDM's UNet: bf16, channels_last, torch.compile and CUDA-graph replay.

Every option computes the fp32 UNet's function up to floating-point tolerance; benchmarks/bench_vldm.py
measures each one's time and error. All return a callable with the samplers' contract,
eps = model(x, log_snr, cond), giving fp32 NCHW ε̂, for inference only (no gradients).

    model = fast_unet(vldm.unet, FastPathConfig())
    x0, x_noisy, noise, alpha_bar = vldm.denoise(latents, features, max_thres, model=model)
"""

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsefusion.config import check_choice

PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass
class FastPathConfig:
    """How to evaluate the UNet; the defaults are the fast path for CUDA."""

    precision: str = "bf16"      # "fp32" or "bf16" (autocast over a bf16 weight copy; norms, softmax, λ features fp32)
    channels_last: bool = True   # NHWC activations and convolution weights
    compile_mode: str = "none"   # "none" or a torch.compile mode (COMPILE_MODES)
    cuda_graph: bool = True      # capture the whole UNet call once per input shape and replay it (CUDA only)


class PreparedUnet(nn.Module):
    """Return ε̂ (B, C, H, W), fp32 and contiguous, from the UNet run at a precision and memory format.

    The UNet is copied when its weights change dtype or layout, so the given module stays as it is.
    """

    def __init__(self, unet, precision="fp32", channels_last=False):
        super().__init__()
        check_choice("precision", precision, PRECISIONS)
        self.bf16, self.channels_last = precision == "bf16", channels_last
        if self.bf16 or channels_last:
            unet = copy.deepcopy(unet).requires_grad_(False)
        if self.bf16:
            unet.to(torch.bfloat16)
            # Fourier features of λ (|λ| up to ~34): bf16 frequencies would shift their phases by ~0.4 rad.
            unet.to_time_hiddens.float()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        self.unet = unet

    @torch.no_grad()
    def forward(self, x, log_snr, cond=None):
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if cond is not None:
            cond = cond.contiguous(memory_format=layout)
        # cache_enabled=False: the weights are already bf16, and a cast cache cannot live in a CUDA graph.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            eps = self.unet(x.contiguous(memory_format=layout), log_snr, cond)
        return eps.float().contiguous()


class CudaGraphReplay:
    """Return fn(*args) by replaying a CUDA graph captured on the first call with each input signature.

    Arguments are copied into the graph's static inputs; the output is returned as a fresh tensor, so
    results of earlier calls (a PLMS history) stay valid. fn must be free of host synchronisation.
    """

    def __init__(self, fn, warmup_calls=3):
        self.fn, self.warmup_calls = fn, warmup_calls
        self.graphs = {}  # signature -> (graph, static inputs, static output)

    @torch.no_grad()
    def __call__(self, *args):
        signature = tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)
        if signature not in self.graphs:
            self.graphs[signature] = self._capture(args)
        graph, inputs, output = self.graphs[signature]
        for static, arg in zip(inputs, args):
            if static is not None:
                static.copy_(arg)
        graph.replay()
        return output.clone()

    def _capture(self, args):
        inputs = [None if a is None else a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuDNN autotuning, lazy init, compilation) outside the capture
            for _ in range(self.warmup_calls):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        return graph, inputs, output


class _CompiledCudaGraphs:
    """Return fn(*args) of a torch.compile(mode="reduce-overhead") fn as a fresh tensor (its graphs reuse outputs)."""

    def __init__(self, fn):
        self.fn = fn

    @torch.no_grad()
    def __call__(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return self.fn(*args).clone()


class PaddedBatches:
    """Return fn(x, log_snr, cond) for any batch B, running fn at the smallest bucket size ≥ B (B itself beyond them).

    The buckets are the powers of two below max_batch, and max_batch. The rows are padded by repeating the
    last one and the padding's outputs dropped, so each row's result is fn's on that row (fn treats rows
    independently, as the UNet does). For the grouped PLMS of several scenes (sparsefusion/multi_scene.py),
    whose batch shrinks as scenes finish: a CUDA-graphed or compiled UNet then sees log2(max_batch) + 1
    shapes at most (graphs captured, compilations) instead of one per batch size.
    """

    def __init__(self, fn, max_batch):
        self.fn = fn
        self.sizes = sorted({2 ** k for k in range(max(max_batch, 1).bit_length()) if 2 ** k < max_batch} | {max_batch})

    def __call__(self, x, log_snr, cond=None):
        batch = x.shape[0]
        size = next((size for size in self.sizes if size >= batch), batch)
        if size == batch:
            return self.fn(x, log_snr, cond)

        def padded(tensor):
            return None if tensor is None else torch.cat([tensor, tensor[-1:].expand(size - batch, *tensor.shape[1:])])

        return self.fn(padded(x), padded(log_snr), padded(cond))[:batch]


def use_persistent_compile_cache():
    """Point torch.compile's caches at ~/.cache/sparsefusion/inductor unless TORCHINDUCTOR_CACHE_DIR is set.

    Inductor's default, /tmp/torchinductor_$USER, is gone after a reboot; compiling the UNet takes about a
    minute per batch shape, which a warm cache turns into seconds (docs/demo.md, "Speed").
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsefusion" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))


def fast_unet(unet, config=None):
    """Return a callable (x, log_snr, cond) -> ε̂ (B, C, H, W) fp32 evaluating unet on the configured fast path."""
    config = config or FastPathConfig()
    check_choice("compile_mode", config.compile_mode, COMPILE_MODES)
    if config.compile_mode == "reduce-overhead" and config.cuda_graph:
        raise ValueError('compile_mode "reduce-overhead" captures CUDA graphs itself; set cuda_graph=False')
    model = PreparedUnet(unet, config.precision, config.channels_last)
    if config.compile_mode != "none":
        use_persistent_compile_cache()
        model = torch.compile(model, mode=config.compile_mode, dynamic=False)
    if config.compile_mode == "reduce-overhead":
        return _CompiledCudaGraphs(model)
    if config.cuda_graph:
        return CudaGraphReplay(model)
    return model

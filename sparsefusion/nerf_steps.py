"""A NeRF's training renders and Adam steps: eager, or each replayed from a CUDA graph.

One NeRF step at upstream's size (128² rays × 128 samples: grid encoder, MLP, sampling, compositing,
their backward, Adam) launches about a thousand small kernels; on an H200 their launches cost ~6 ms of
a ~20 ms step (docs/demo.md, "Speed"). Its shapes are fixed, so each kind of render (K cameras at a
time: the context step's one, the fusion step's views_per_step) is captured once as two graphs and
replayed:

    steps = NeRFSteps(render, nerf.parameters(), optimizer, generators, graphed=True)
    images, silhouettes = steps.render([3, 7])   # graph 1: the render of cached cameras 3 and 7
    loss = loss_of(images, silhouettes)          # eager: whatever the step minimises (guidance, Huber terms)
    steps.descend(loss)                          # eager backward to the render's outputs, then graph 2:
                                                 # the render's backward into the gradients, and Adam's step

The graphs compute what the eager step computes: the render draws its jitter from the same device
generators (registered with the graph, so every replay continues their streams as eager draws
would), the gradients are zeroed and recomputed at every step, and the optimiser is a capturable
Adam whose learning rates the graph holds; when a scheduler changes them the graphs are captured
again. The first `warmup` renders of each kind run eagerly, so that Triton compilation, cuBLAS and
the allocator's set-up happen outside capture. tests/test_fast_paths_cuda.py checks a graphed
distillation against the eager one, iteration by iteration.
"""

from collections import Counter
from dataclasses import dataclass

import torch


def nerf_optimizer(parameter_groups, lr, graphed):
    """Return the NeRF's Adam over parameter_groups (NeRFNetwork.get_params); graphed: one a CUDA graph can hold."""
    if graphed:
        return torch.optim.Adam(parameter_groups, lr=lr, capturable=True, fused=True)
    return torch.optim.Adam(parameter_groups, lr=lr)


@dataclass
class _Captured:
    """One kind of render as graphs: its static index, outputs and output gradients, and the lrs it holds."""

    index: torch.Tensor         # (K,) the cameras rendered, copied in before each replay
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    outputs: tuple              # the render's outputs, rewritten by each replay of forward
    grad_outputs: list          # their gradients, read by backward
    lrs: list                   # the optimiser's learning rates at capture


class NeRFSteps:
    """Training renders of K cameras and Adam steps on their losses, replayed from CUDA graphs when graphed."""

    def __init__(self, render, parameters, optimizer, generators=(), graphed=False, warmup=2):
        """Args:
            render: index (K,) int64 on the device -> tuple of tensors, the renders of cameras index; it must
                launch the same kernels for every index of one length.
            parameters: what render's outputs depend on and optimizer steps (their .grad are kept allocated).
            optimizer: nerf_optimizer(..., graphed).
            generators: the device generators render draws from.
            graphed: replay CUDA graphs (CUDA only); False runs every step eagerly.
            warmup: eager renders of each length before its capture.
        """
        self.render_index, self.optimizer = render, optimizer
        self.parameters = list(parameters)
        self.generators, self.graphed, self.warmup = list(generators), graphed, warmup
        self.device = self.parameters[0].device
        if graphed and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the NeRF on a CUDA device, not {self.device}")
        for parameter in self.parameters:
            parameter.grad = torch.zeros_like(parameter)
        self.grads = [parameter.grad for parameter in self.parameters]
        self.pool = torch.cuda.graph_pool_handle() if graphed else None
        self.captured = {}       # K -> _Captured
        self.renders = Counter()  # K -> renders so far
        self.pending = None      # (the _Captured, its leaf outputs) of the last graphed render, for descend

    def render(self, views):
        """Return the render's outputs for cameras views (K ints); with graphs, leaves whose gradients descend reads."""
        index = torch.as_tensor(views, dtype=torch.long)
        captured = self._graphs(len(views)) if self.graphed else None
        if captured is None:
            self.pending = None
            return self.render_index(index.to(self.device, non_blocking=True))
        captured.index.copy_(index, non_blocking=True)
        captured.forward.replay()
        leaves = tuple(output.detach().requires_grad_() for output in captured.outputs)
        self.pending = captured, leaves
        return leaves

    def descend(self, loss):
        """Take one Adam step on loss, a scalar of the last render's outputs."""
        if self.pending is None:
            torch._foreach_zero_(self.grads)
            loss.backward()
            self.optimizer.step()
            return
        (captured, leaves), self.pending = self.pending, None
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for static, grad in zip(captured.grad_outputs, grads):
            static.zero_() if grad is None else static.copy_(grad)
        captured.backward.replay()

    def _graphs(self, k):
        """Return the graphs of renders of k cameras, captured now if due, or None while they are warming up."""
        self.renders[k] += 1
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if k in self.captured and self.captured[k].lrs != lrs:
            # a scheduler changed the rates the graphs hold; their pool, released with them, cannot be reopened
            self.captured.clear()
            self.pool = torch.cuda.graph_pool_handle()
        if k not in self.captured and self.renders[k] > self.warmup:
            self.captured[k] = self._capture(k, lrs)
        return self.captured.get(k)

    def _capture(self, k, lrs):
        index = torch.zeros(k, dtype=torch.long, device=self.device)
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        for generator in self.generators:
            forward.register_generator_state(generator)
        with torch.cuda.graph(forward, pool=self.pool, capture_error_mode="thread_local"):
            outputs = tuple(self.render_index(index))
        grad_outputs = [torch.zeros_like(output) for output in outputs]
        with torch.cuda.graph(backward, pool=self.pool, capture_error_mode="thread_local"):
            torch._foreach_zero_(self.grads)
            torch.autograd.backward(outputs, grad_outputs, retain_graph=True)
            self.optimizer.step()
        return _Captured(index, forward, backward, outputs, grad_outputs, lrs)

"""Process groups for demo.py and train.py: `-g N` spawns N local processes; torchrun works too.

Under torchrun the environment already names RANK, LOCAL_RANK and WORLD_SIZE and nothing is spawned.
Otherwise `launch` spawns N processes on this machine, with MASTER_PORT 1234{port} as upstream.
NCCL is used when the processes have GPUs, gloo otherwise.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsefusion.errors import UserError


@dataclass
class Rank:
    """Where this process stands among its peers."""

    rank: int           # global rank, 0 writes shared files
    local_rank: int     # index of this process on its machine, also its GPU index
    world_size: int     # number of processes
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def split_list(items, n_parts):
    """Return items split into n_parts contiguous parts whose lengths differ by at most one, as upstream."""
    size, extra = divmod(len(items), n_parts)
    return [items[i * size + min(i, extra):(i + 1) * size + min(i + 1, extra)] for i in range(n_parts)]


def check_gpu_count(n_procs):
    """Raise UserError if n_procs GPUs are asked for on a machine with fewer (CPU-only runs may use any)."""
    if n_procs < 1:
        raise UserError(f"-g/--gpus must be at least 1, got {n_procs}")
    available = torch.cuda.device_count()
    if available and n_procs > available:
        raise UserError(f"-g/--gpus {n_procs} asks for more GPUs than the {available} present; use -g {available} or fewer")


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launch(worker, n_procs, port, backend=None, args=()):
    """Run worker(rank: Rank, *args) in n_procs processes (or in this one under torchrun / for one process).

    Ranks are passed explicitly, never left in this process's environment, so that a later launch
    in the same process (tests, notebooks) does not mistake itself for a torchrun worker.
    """
    if under_torchrun():
        _run(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
             worker, backend, args)
    elif n_procs == 1:
        _run(0, 0, 1, worker, backend, args)
    else:
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ["MASTER_PORT"] = f"1234{port}"
        try:
            mp.spawn(_spawned, nprocs=n_procs, args=(n_procs, worker, backend, args))
        except mp.ProcessExitedException as err:  # a rank stopped on a user error, which it has printed
            raise UserError(f"process {err.error_index} of {n_procs} stopped (exit status {err.exit_code}); "
                            "its message is above") from None


def _spawned(local_rank, n_procs, worker, backend, args):
    _run(local_rank, local_rank, n_procs, worker, backend, args)


def _run(rank, local_rank, world_size, worker, backend, args):
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                world_size=world_size, rank=rank)
    try:
        worker(Rank(rank, local_rank, world_size, device), *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Process groups for demo.py and train.py: `-g N` spawns N local processes; torchrun works too.

Under torchrun the environment already names RANK, LOCAL_RANK and WORLD_SIZE and nothing is spawned
(runs over several machines need a trusted network: the rendezvous and the backends do not
authenticate). Otherwise `launch` spawns N processes on this machine that meet on port 1234{port}
of the loopback, as upstream's port. NCCL is used when the processes have GPUs, gloo otherwise.
"""

import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def check_port(port):
    """Raise UserError unless port is one digit: the rendezvous port is 1234{port}, as upstream's."""
    if not 0 <= port <= 9:
        raise UserError(f"-p/--port {port} must be a single digit 0-9 (the port is 1234{{p}}); e.g. -p 2")


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def launch(worker, n_procs, port, backend=None, args=()):
    """Run worker(rank: Rank, *args) in n_procs processes (or in this one under torchrun / for one process).

    Spawned processes meet on the loopback only: rank 0's rendezvous store listens on 127.0.0.1:1234{port}
    and gloo talks over lo (torchrun runs, which may span machines, use the network torchrun names).
    A rank's UserError is printed once, by this process, however many ranks raised it. Ranks are
    passed explicitly, never left in this process's environment, so that a later launch in the same
    process (tests, notebooks) does not mistake itself for a torchrun worker.
    """
    if under_torchrun():
        _run(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
             worker, backend, args, store=None)
    elif n_procs == 1:
        _run(0, 0, 1, worker, backend, args, store=None)
    else:
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # its notes on stopping the others
        with tempfile.TemporaryDirectory(prefix="sparsefusion-ranks-") as messages:
            try:
                mp.spawn(_spawned, nprocs=n_procs, args=(n_procs, 12340 + port, messages, worker, backend, args))
            except mp.ProcessExitedException as err:
                if err.exit_code == 130:  # a rank's Ctrl-C, which this process may not have seen
                    raise KeyboardInterrupt from None
                raise UserError(rank_failure(err, n_procs, messages)) from None


def rank_failure(err, n_procs, messages):
    """Return the lines saying why a spawned rank stopped: the ranks' own messages, each once, or how it died."""
    lines = dict.fromkeys(line for path in sorted(Path(messages).iterdir()) for line in path.read_text().splitlines())
    if lines:
        return "\n".join(lines)
    if err.signal_name:
        return (f"process {err.error_index} of {n_procs} was killed by {err.signal_name} and said nothing; "
                f"SIGKILL is often the out-of-memory killer (see dmesg): use fewer -g processes or smaller settings")
    return f"process {err.error_index} of {n_procs} stopped with exit status {err.exit_code} and said nothing"


def _spawned(local_rank, n_procs, port, messages, worker, backend, args):
    """A spawned rank: a UserError goes to the messages folder for the parent to print, exit status 2."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        _run(local_rank, local_rank, n_procs, worker, backend, args, store=loopback_store(port, local_rank, n_procs))
    except UserError as err:
        (Path(messages) / f"rank{local_rank}.txt").write_text(str(err))
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the parent says what was kept
        sys.exit(130)


def loopback_store(port, rank, world_size, timeout_s=300):
    """Return the rendezvous TCPStore of a one-machine run: rank 0's server listens on 127.0.0.1 only."""
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as err:
        raise UserError(f"port {port} on 127.0.0.1 is taken ({err.strerror}): another run uses it; "
                        f"pick another -p/--port digit") from err
    listener.listen()
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         master_listen_fd=listener.detach())


def _run(rank, local_rank, world_size, worker, backend, args, store):
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"),
                                **({"init_method": "env://"} if store is None else {"store": store}),
                                world_size=world_size, rank=rank)
    try:
        worker(Rank(rank, local_rank, world_size, device), *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""What the benchmark scripts measure, defined once: wall time, and error against a reference.

Imported as `measures`: scripts run with their folder on sys.path.
"""

import statistics
import time

import torch


def median_seconds(fn, device, repeats, warmup=1):
    """Return the median wall time of fn() in seconds over repeats calls after warmup calls.

    The device is synchronised before and after each timed call, so queued GPU work is counted.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def call_ms(fn, device):
    """Return the time of one fn() call in milliseconds: CUDA events on a GPU, the host clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def relative_error(value, reference):
    """Return ||value - reference|| / ||reference||, L2 over all elements in float64: every benchmark's error.

    value, reference: tensors of one shape (any devices) or numbers; for numbers this is |a - b| / |b|.
    """
    value, reference = (torch.as_tensor(x, dtype=torch.float64).detach().cpu() for x in (value, reference))
    return ((value - reference).norm() / reference.norm().clamp_min(1e-300)).item()

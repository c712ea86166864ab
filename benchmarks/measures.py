"""What the benchmark scripts measure, defined once: wall time, error against a reference, the results file.

Imported as `measures`: scripts run with their folder on sys.path.
"""

import json
import statistics
import time

import torch


def synchronize(device):
    """Wait for the work queued on device (CUDA); nothing to wait for elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    """Return (median wall time in seconds, last result) of fn() over repeats calls after warmup calls.

    The device is synchronised before and after each timed call, so queued GPU work is counted.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def median_seconds(fn, device, repeats, warmup=1):
    """Return the median wall time of fn() in seconds over repeats calls after warmup calls (see timed)."""
    return timed(fn, device, repeats, warmup)[0]


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


def write_results(results, path, digits=6):
    """Print results {name: value} one per line, floats to digits significant digits, and write them as JSON."""
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.{digits}g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    with open(path, "w") as file:
        json.dump(results, file, indent=2)

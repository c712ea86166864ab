"""Progress of long work: a tqdm bar on a terminal, a plain line at intervals when stderr is redirected.

A redirected tqdm bar is either off (tqdm's disable=None) or a stream of carriage returns; a log
file or a batch system's output wants lines. Both kinds offer update, set_postfix, set_description
and close, so loops need not know which they got.

    bar = progress_bar(3000, "hydrant_000_c2")
"""

import sys
import time

from tqdm import tqdm

LINE_SECONDS = 60  # a redirected run prints a progress line this often


def progress_bar(total, desc, initial=0, position=0, enabled=True):
    """Return a tqdm bar on a terminal, a LineProgress when stderr is redirected, a silent bar when not enabled."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, initial)
    return tqdm(total=total, desc=desc, initial=initial, position=position, disable=not enabled, dynamic_ncols=True)


class LineProgress:
    """tqdm's interface, printing 'desc: n/total (p%), elapsed, left[, postfix]' every LINE_SECONDS and at the end."""

    def __init__(self, total, desc, initial=0, seconds=LINE_SECONDS):
        self.total, self.desc, self.n, self.seconds = total, desc, initial, seconds
        self.start_n, self.postfix = initial, ""
        self.start = self.last_print = time.monotonic()

    def update(self, n=1):
        self.n += n
        if time.monotonic() - self.last_print >= self.seconds:
            self.print_line()

    def set_postfix(self, values):
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def set_description(self, desc):
        self.desc = desc

    def close(self):
        if self.n > self.start_n:
            self.print_line()

    def print_line(self):
        """Print the line now: counts, percentage, elapsed time and an estimate of the time left."""
        self.last_print = time.monotonic()
        elapsed = self.last_print - self.start
        done = self.n - self.start_n
        left = elapsed / done * (self.total - self.n) if done else float("nan")
        line = (f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), "
                f"{clock(elapsed)} elapsed, {clock(left)} left" + (f", {self.postfix}" if self.postfix else ""))
        print(line, file=sys.stderr, flush=True)


def clock(seconds):
    """Return seconds as H:MM:SS ('?' when unknown)."""
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"

"""Progress of long runs when stderr is a terminal and when it is redirected."""

import io
import sys

from tqdm import tqdm

from sparsefusion.progress import LineProgress, clock, progress_bar


def test_redirected_runs_get_lines_at_intervals_and_at_the_end(capsys):
    bar = progress_bar(10, "hydrant_000_c2")  # pytest's stderr is no terminal
    assert isinstance(bar, LineProgress)
    bar.seconds = 0  # a line at every update
    bar.update(4)
    bar.set_postfix({"vol": "0.0123"})
    bar.update(1)
    bar.seconds = 3600
    bar.update(5)  # within the interval: no line ...
    bar.close()    # ... but the end is always told
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("hydrant_000_c2: 4/10 (40%), 0:00:00 elapsed, 0:00:00 left")
    assert lines[1].endswith(", vol 0.0123") and lines[2].startswith("hydrant_000_c2: 10/10 (100%)")


def test_terminals_get_a_bar_and_disabled_bars_are_silent(monkeypatch):
    monkeypatch.setattr(sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    bar = progress_bar(5, "train")
    assert isinstance(bar, tqdm)
    bar.close()
    sys.stderr.seek(0)
    sys.stderr.truncate()
    silent = progress_bar(5, "train", enabled=False)
    silent.update(5)
    silent.close()
    assert sys.stderr.getvalue() == ""
    assert clock(3725.2) == "1:02:05" and clock(float("nan")) == "?"

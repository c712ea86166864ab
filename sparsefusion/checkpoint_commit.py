"""A checkpoint of several files committed as one: a kill at any moment leaves the old set or the new one.

train.py's checkpoint is a set of files (ckpt_latest.pt and ckpt_latest_eft.pt), saved in three moves:
  1. each file to its pending name, .{name}.pending (each whole or not at all: atomic_files.py);
  2. the commit point: a manifest .{first name}.commit naming the set, written atomically;
  3. each pending file renamed over its final name, then the manifest removed.
At the next start, finish_interrupted_commits completes move 3 wherever a manifest is left (the new
set was whole) and remove_uncommitted deletes pending files that no manifest names (the save died
before its commit point, so the previous set is intact).
"""

import json
import os
from pathlib import Path

from sparsefusion.checkpoint import save_atomic
from sparsefusion.outputs import write_text


def pending_path(path):
    """Return the name a file of a set is written to before the set is committed."""
    path = Path(path)
    return path.with_name(f".{path.name}.pending")


def manifest_path(paths):
    """Return the commit manifest of a set of files (beside its first file)."""
    first = Path(next(iter(paths)))
    return first.with_name(f".{first.name}.commit")


def save_together(objects):
    """Write {path: object} as one commit: every file is the new one, or (after a kill) every file the old one."""
    for path, obj in objects.items():
        save_atomic(obj, pending_path(path))
    manifest = manifest_path(objects)
    write_text(json.dumps([Path(path).name for path in objects]), manifest)  # the commit point
    complete_commit(manifest)


def complete_commit(manifest):
    """Rename the pending files a manifest names over their final names, then remove it; return the final paths."""
    finals = [manifest.parent / name for name in json.loads(manifest.read_text())]
    for final in finals:
        if pending_path(final).exists():  # a kill during the renames leaves some already renamed
            os.replace(pending_path(final), final)
    manifest.unlink()
    return finals


def finish_interrupted_commits(folder):
    """Complete the commits a kill interrupted under folder; return the file sets that were completed."""
    return [complete_commit(manifest) for manifest in sorted(Path(folder).glob(".*.commit"))]


def uncommitted(folder):
    """Return the pending files under folder that no commit names (saves killed before their commit point)."""
    return sorted(Path(folder).glob(".*.pending"))


def remove_uncommitted(folder):
    """Delete the pending files of saves that never reached their commit point; return their paths."""
    stale = uncommitted(folder)
    for path in stale:
        path.unlink()
    return stale

"""Files written whole or not at all, and folders checked before a run writes into them.

Every file the project writes (images, GIFs, JSON, plots, checkpoints, meshes, generated datasets)
goes through atomic_path: the content goes to a temporary beside the target, named
.{name}.partial-{pid}-XXXX{suffix}, which replaces the target only once complete. A kill at any
moment leaves the old file or the new one, plus at most that temporary; remove_stale_temporaries
deletes the temporaries whose writing process is gone, when the next run starts.

    with atomic_path("out/x.json") as tmp:
        tmp.write_text(...)
"""

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from sparsefusion.errors import UserError

TEMPORARY = re.compile(r"^\..+\.partial-(\d+)-")  # the name atomic_path gives its temporaries
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
ALMOST_FULL_BYTES = 1 << 20  # below this much free space a failed write is taken for a full disk


class atomic_path:
    """Context manager: a temporary path beside `path` that replaces it on success and vanishes on failure.

    A write that fails for want of space or permission is a UserError naming the file and the fix.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.partial-{os.getpid()}-",
                                       suffix=self.path.suffix)
        except OSError as err:
            raise UserError(write_failure(self.path, err)) from err
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs are shared like any file
            os.replace(self.tmp, self.path)
            return False
        full = disk_almost_full(self.path.parent)  # measured while the temporary still holds its space
        if self.tmp.exists():
            self.tmp.unlink()
        if isinstance(exc, OSError) or full:  # torch.save reports a full disk as a RuntimeError
            raise UserError(write_failure(self.path, exc, full)) from exc
        return False


def write_failure(path, err, full=False):
    """Return one line saying why path could not be written and what to do."""
    if full or getattr(err, "errno", None) in FULL_DISK:
        return f"cannot write {path}: the disk is full; free space there or choose another output folder"
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    return f"cannot write {path}: {reason}; make its folder writable or choose another output folder"


def disk_almost_full(folder):
    """Return whether the file system holding folder has less than ALMOST_FULL_BYTES free."""
    try:
        return shutil.disk_usage(folder).free < ALMOST_FULL_BYTES
    except OSError:
        return False


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(data, path):
    """Write bytes to path atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def process_alive(pid):
    """Return whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the temporaries under folder that killed runs left (their process is gone); return their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in folder.rglob(".*.partial-*"):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def writable_folder_problems(folder, needed_bytes, what):
    """Return one-line problems ([] if none) with writing needed_bytes under folder, before a run starts.

    Nothing is created: the folder, or the nearest existing folder above it, is probed with an
    unnamed temporary file.
    """
    folder = Path(folder)
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return [f"{what} {folder} is not writable ({err.strerror or err}); make {existing} writable "
                f"or choose another folder"]
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        return [f"{what} {folder} has {free / 2**20:.0f} MiB free but the run writes about "
                f"{needed_bytes / 2**20:.0f} MiB; free space there or choose another folder"]
    return []

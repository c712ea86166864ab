"""Files written whole or not at all: temporaries left by killed runs, full disks, unwritable folders, modes."""

import errno
import json
import os
import stat
import subprocess

import numpy as np
import pytest

from sparsefusion import atomic_files
from sparsefusion.atomic_files import atomic_path, remove_stale_temporaries, writable_folder_problems, write_bytes
from sparsefusion.errors import UserError
from sparsefusion.mesh import write_mesh
from sparsefusion.outputs import write_json


def dead_pid():
    """Return the id of a process that has ended."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_temporaries_of_ended_processes_are_removed_and_live_ones_kept(tmp_path):
    (tmp_path / "render_gifs").mkdir()
    stale = tmp_path / "render_gifs" / f".scene.gif.partial-{dead_pid()}-k2j4.gif"
    live = tmp_path / f".summary.json.partial-{os.getpid()}-x8a1.json"  # a write in progress
    user_file = tmp_path / ".scene.gif.notes"
    for path in (stale, live, user_file):
        path.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and user_file.exists()


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    with pytest.raises(UserError, match=r"cannot write .*ckpt\.pt: the disk is full; free space"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."): told apart by the free space
    monkeypatch.setattr(atomic_files, "disk_almost_full", lambda folder: True)
    with pytest.raises(UserError, match="the disk is full"):
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1960")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_folder_checks_report_unwritable_and_small_folders_without_creating_them(tmp_path, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    problems = writable_folder_problems(a_file / "out", 1, "output folder -o")
    assert len(problems) == 1 and "output folder -o" in problems[0] and "is not writable" in problems[0]
    assert writable_folder_problems(tmp_path / "new" / "out", 1, "output folder -o") == []
    assert not (tmp_path / "new").exists()

    class Usage:
        free = 5 * 2**20
    monkeypatch.setattr(atomic_files.shutil, "disk_usage", lambda folder: Usage)
    problems = writable_folder_problems(tmp_path, 50 * 2**20, "exp_dir")
    assert problems == [f"exp_dir {tmp_path} has 5 MiB free but the run writes about 50 MiB; free space there "
                        f"or choose another folder"]
    with pytest.raises(UserError, match="cannot write .*: Not a directory"):
        write_bytes(b"x", a_file / "out" / "x.bin")


def test_meshes_and_json_get_the_umask_mode_not_a_private_one(tmp_path):
    mask = os.umask(0o022)
    try:
        mesh = write_mesh(tmp_path / "m.ply", np.zeros((3, 3), np.float32), np.array([[0, 1, 2]]),
                          np.zeros((3, 3), np.uint8))
        summary = write_json({"psnr": 1.0}, tmp_path / "s.json")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(mesh.stat().st_mode) == stat.S_IMODE(summary.stat().st_mode) == 0o644


def test_json_has_null_where_a_value_is_not_finite(tmp_path):
    path = write_json({"psnr": float("nan"), "frames": [{"lpips": float("inf")}, {"ssim": 0.5}]}, tmp_path / "m.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"psnr": None, "frames": [{"lpips": None}, {"ssim": 0.5}]}

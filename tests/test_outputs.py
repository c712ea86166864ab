import json

import imageio.v2 as imageio
import numpy as np
import pytest

from sparsefusion.outputs import image_grid, plot_losses, side_by_side, write_gif, write_image, write_json


def test_panels_and_grid_layout():
    rgb = np.random.rand(8, 6, 3)
    mask = np.random.rand(8, 6, 1)
    panel = side_by_side([rgb, mask, rgb])
    assert panel.shape == (8, 18, 3) and panel.dtype == np.uint8
    assert (panel[:, 6:12, 0] == panel[:, 6:12, 2]).all()  # the mask panel is grey
    grid = image_grid([rgb] * 5, per_row=2)
    assert grid.shape == (24, 12, 3) and (grid[16:, 6:] == 0).all()


def test_gif_and_image_round_trip(tmp_path):
    frames = [np.full((4, 5, 3), i / 3.0) for i in range(4)]
    path = write_gif(frames, tmp_path / "a.gif")
    read = imageio.mimread(path)
    assert len(read) == 4 and read[0].shape[:2] == (4, 5)
    assert abs(int(read[3][0, 0, 0]) - 255) <= 2
    write_image(frames[1], tmp_path / "b.png")
    assert imageio.imread(tmp_path / "b.png")[0, 0, 0] == 85
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "b.png"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):
        write_json({"x": object()}, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []
    write_json({"psnr": 20.5}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"psnr": 20.5}


def test_loss_plot_is_an_image(tmp_path):
    path = plot_losses({"colour": [3, 2, 1], "fusion": []}, tmp_path / "loss.jpg")
    assert imageio.imread(path).ndim == 3


def test_atomic_files_are_readable_like_any_other(tmp_path):
    import os
    mask = os.umask(0o022)
    try:
        path = write_json({}, tmp_path / "m.json")
    finally:
        os.umask(mask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)

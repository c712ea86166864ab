"""benchmarks/mini_quality.py: which runs it starts, and how its table pools scenes and seeds."""

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mini_quality", REPO / "benchmarks" / "mini_quality.py")
mini_quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mini_quality)


def write_metrics(out, method, views, seed, category, index, psnr, baselines=None):
    folder = mini_quality.run_dir(out, method, views, seed, category) / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"novel_views": {"psnr": psnr, "ssim": psnr / 100, "lpips": None}}
    if baselines:
        record["baselines"] = {name: {"novel_views": {"psnr": value, "ssim": 0.5, "lpips": 0.2}}
                               for name, value in baselines.items()}
    (folder / f"{category}_{index:03d}_c{views}.json").write_text(json.dumps(record))


def test_the_table_is_the_mean_and_spread_over_seeds_of_means_over_scenes(tmp_path):
    # seed 0: scenes 10 and 20 (mean 15) over two categories; seed 1: 30 and 40 (mean 35)
    for seed, (a, b) in ((0, (10.0, 20.0)), (1, (30.0, 40.0))):
        write_metrics(tmp_path, "sparsefusion", 2, seed, "hydrant", 0, a, baselines={"eft": a - 1})
        write_metrics(tmp_path, "sparsefusion", 2, seed, "vase", 0, b, baselines={"eft": b - 1})
        write_metrics(tmp_path, "inputs_only", 2, seed, "hydrant", 0, a / 2)
        write_metrics(tmp_path, "inputs_only", 2, seed, "vase", 0, b / 2)
    args = Namespace(out=tmp_path, views=[2], seeds=[0, 1], categories=["hydrant", "vase"], scenes=1,
                     methods=list(mini_quality.METHODS))
    rows = mini_quality.table(args)[2]
    assert rows["sparsefusion"]["psnr"] == {"mean": 25.0, "std": 10.0, "seeds": 2, "scenes": [2, 2]}
    assert rows["inputs_only"]["psnr"]["mean"] == 12.5 and rows["eft"]["psnr"]["mean"] == 24.0
    assert rows["sparsefusion"]["ssim"]["mean"] == pytest.approx(0.25)
    assert "lpips" not in rows["sparsefusion"] and rows["eft"]["lpips"]["mean"] == pytest.approx(0.2)
    assert "(c) distilled NeRF (the method) | 25.00 ± 10.00 | 0.250 ± 0.100 | n/a | 2, 2 |" in mini_quality.markdown(
        mini_quality.table(args))
    only_method = mini_quality.table(Namespace(**{**vars(args), "methods": ["sparsefusion"]}))[2]
    assert "inputs_only" not in only_method and only_method["sparsefusion"] == rows["sparsefusion"]


def test_only_the_scenes_without_metrics_are_run_again(tmp_path):
    write_metrics(tmp_path, "sparsefusion", 3, 0, "hydrant", 1, 20.0)
    folder = mini_quality.run_dir(tmp_path, "sparsefusion", 3, 0, "hydrant")
    todo = mini_quality.missing_scenes(folder, "hydrant", 3, 3)
    assert todo == [0, 2]
    command = mini_quality.demo_command(folder, "sparsefusion", 3, 0, "hydrant", todo, ["distill.iterations=5"])
    assert command[command.index("-i") + 1] == "0,2" and command[command.index("-v") + 1] == "3"
    assert "baselines=true" in command and command[-1] == "distill.iterations=5"
    assert "baselines=true" not in mini_quality.demo_command(folder, "inputs_only", 3, 0, "hydrant", todo, [])

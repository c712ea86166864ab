import json

import pytest

from evaluate import main
from sparsefusion.errors import UserError
from sparsefusion.evaluation import evaluate_run, load_scene_records

# Unequal scene counts, so the mean over scenes differs from the mean of category means.
SCENES = [
    ("metrics/hydrant_000_c2.json", "hydrant", "hydrant_000_c2", 20.0, 0.70, 0.30),
    ("metrics/hydrant_001_c2.json", "hydrant", "hydrant_001_c2", 22.0, 0.80, 0.20),
    ("rank1/metrics/hydrant_002_c2.json", "hydrant", "hydrant_002_c2", 27.0, 0.90, 0.10),
    ("metrics/teddybear_000_c2.json", "teddybear", "teddybear_000_c2", 10.0, 0.50, None),
]


def _write_run(run):
    for path, category, sequence, psnr, ssim, lpips in SCENES:
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        scene = {"sequence": sequence, "category": category, "psnr": psnr, "ssim": ssim, "lpips": lpips, "frames": 8}
        (run / path).write_text(json.dumps(scene))
    (run / "config.json").write_text(json.dumps({"category": "hydrant", "iterations": 3000}))
    return run


def test_means_over_scenes_per_category_and_overall(tmp_path):
    run = _write_run(tmp_path / "run")
    summary, json_path, md_path = evaluate_run(run)
    hydrant, teddybear, overall = summary["categories"]["hydrant"], summary["categories"]["teddybear"], summary["overall"]
    assert hydrant == pytest.approx({"scenes": 3, "psnr": 23.0, "ssim": 0.8, "lpips": 0.2})
    assert teddybear == {"scenes": 1, "psnr": 10.0, "ssim": 0.5, "lpips": None}
    assert overall == pytest.approx({"scenes": 4, "psnr": 19.75, "ssim": 0.725, "lpips": None})
    assert [r["sequence"] for r in summary["per_scene"]] == [s[2] for s in SCENES]

    assert json_path == run / "metrics_summary.json" and md_path == run / "metrics_summary.md"
    written = json.loads(json_path.read_text())
    assert written["overall"] == summary["overall"] and written["categories"] == summary["categories"]
    markdown = md_path.read_text()
    assert "| hydrant | 3 | 23.00 | 0.800 | 0.200 |" in markdown
    assert "| teddybear | 1 | 10.00 | 0.500 | n/a |" in markdown
    assert "| **all** | 4 | 19.75 | 0.725 | n/a |" in markdown
    assert "| hydrant | hydrant_002_c2 | 27.00 | 0.900 | 0.100 |" in markdown
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]

    (run / ".metrics_summary.abc.json").write_text("{unfinished")  # what an interrupted write leaves
    again, _, _ = evaluate_run(run)  # neither that nor the summary it wrote is read as a scene
    assert again["overall"] == summary["overall"]


def test_command_prints_the_table_and_writes_where_asked(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    main([str(run), "--out", str(tmp_path / "tables" / "hydrant")])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| category | scenes | PSNR ↑ | SSIM ↑ | LPIPS ↓ |"
    assert "| **all** | 4 | 19.75 | 0.725 | n/a |" in printed
    assert (tmp_path / "tables" / "hydrant.json").is_file() and (tmp_path / "tables" / "hydrant.md").is_file()


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "no per-scene metrics JSON"),
        ({"config.json": {"iterations": 3}}, "no per-scene metrics JSON"),
        ({"a.json": "{not json"}, "a.json is not valid JSON"),
        ({"a.json": {"sequence": "s", "category": "c", "psnr": 20.0}}, "a.json lacks ssim"),
        ({"a.json": {"sequence": "s", "category": "c", "psnr": "20", "ssim": 0.5}}, "must be numbers"),
        ({"a.json": {"sequence": "s", "category": "c", "psnr": 1.0, "ssim": 0.5},
          "b/a.json": {"sequence": "s", "category": "c", "psnr": 2.0, "ssim": 0.6}}, "scene s \\(c\\) appears twice"),
    ],
)
def test_bad_runs_are_user_errors(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=message):
        load_scene_records(tmp_path)


def test_missing_folder_exits_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder") and "does not exist" in err and err.count("\n") == 1

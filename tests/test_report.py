"""The run page: what it shows and links, escaping, and (where Chromium is installed) how a real browser renders it."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote

import imageio.v2 as imageio
import numpy as np
import pytest

from evaluate import main as evaluate_main
from sparsefusion.outputs import write_gif, write_image, write_text
from sparsefusion.report import group_means, load_run, run_page, update_run_page, write_run_page

# (folder of metrics/, sequence, category, novel (psnr, ssim, lpips), all views, baselines, files left out)
SCENES = [
    ("", "hydrant_000_c2", "hydrant", (21.0, 0.70, 0.30), (23.0, 0.75, 0.25),
     {"eft": (18.0, 0.60, 0.40), "nearest_input": (12.0, 0.40, 0.50)}, ()),
    ("rank1/", "hydrant_001_c2", "hydrant", (15.0, 0.60, 0.45), (18.0, 0.65, 0.40), {}, ("meshes/{seq}.ply",)),
    ("", "teddybear_000_c2", "teddybear", (25.0, 0.80, None), (26.0, 0.85, None), {}, ("log/{seq}_inputs.jpg",)),
]
FILES = ["log/{seq}_inputs.jpg", "render_gifs/{seq}.gif", "render_gifs/{seq}_circle.gif", "log/{seq}_loss.jpg",
         "log/{seq}_fusionloss.jpg", "log/{seq}_eft_grid.jpg", "metrics/{seq}.txt", "meshes/{seq}.ply", "{seq}.pt"]


def _metrics(values):
    return dict(zip(("psnr", "ssim", "lpips"), values))


def _picture(path, seed):
    """Write a small random picture (or a 3-frame GIF) shaped as a run's with 32-pixel views."""
    shapes = {"inputs": (32, 64), "circle": (32, 64), "grid": (64, 256), "loss": (35, 60)}  # else 5 panels
    height, width = next((shape for key, shape in shapes.items() if key in path.name), (32, 160))
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(3)]
    if path.suffix == ".gif":
        write_gif(frames, path)
    else:
        write_image(frames[0], path)


def _write_run(run):
    """Write a finished run of SCENES as reconstruct.py lays it out; return run."""
    for i, (folder, seq, category, novel, every, baselines, left_out) in enumerate(SCENES):
        root = run / folder
        record = {"sequence": seq, "category": category, "scene_index": i, "source_sequence": f"{i}_src",
                  "method": "sparsefusion", "input_views": [3, 7], "n_views": 12, "novel_views": _metrics(novel),
                  **_metrics(every), "frames": [_metrics(every)] * 12,
                  "timings": {"feature_cache_s": 1.5, "bootstrap_s": 40.0, "diffusion_s": 500.0 + 60 * i},
                  "config": {"iterations": 3000}}
        if baselines:
            record["baselines"] = {name: {**_metrics(v), "novel_views": _metrics(v)} for name, v in baselines.items()}
        (root / "metrics").mkdir(parents=True, exist_ok=True)
        (root / "metrics" / f"{seq}.json").write_text(json.dumps(record))
        for j, pattern in enumerate(FILES):
            path = root / pattern.format(seq=seq)
            if pattern in left_out:
                continue
            if path.suffix in (".jpg", ".gif"):
                _picture(path, 10 * i + j)
            else:
                write_text("stand-in\n", path)
    return run


@pytest.fixture
def run(tmp_path):
    return _write_run(tmp_path / "run")


class _Links(HTMLParser):
    """Collects every src and href of a page."""

    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]


def _links(page):
    parser = _Links()
    parser.feed(page)
    return parser.links


def test_page_links_every_written_file_and_nothing_else(run):
    path = write_run_page(run)
    assert path == run / "index.html"
    page = path.read_text()
    links = _links(page)
    files = [unquote(link) for link in links if not link.startswith("#")]
    assert files and all((run / f).is_file() for f in files), [f for f in files if not (run / f).is_file()]
    assert "rank1/render_gifs/hydrant_001_c2.gif" in files  # a scene under a sub-folder keeps its folder
    assert "rank1/meshes/hydrant_001_c2.ply" not in files and "meshes/hydrant_000_c2.ply" in files
    assert "log/teddybear_000_c2_inputs.jpg" not in files and page.count("not written") == 1
    assert [link for link in links if link.startswith("#")] == [f"#scene-{s[1]}" for s in SCENES]
    assert not any(link.startswith(("/", "http:", "https:", "file:")) for link in links)  # relative only
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # written atomically


def test_means_per_category_and_overall_per_method(run):
    rows = {(group, method): (n, novel, every) for group, method, n, novel, every in group_means(load_run(run))}
    assert list(rows) == [("hydrant", "sparsefusion"), ("hydrant", "EFT"), ("hydrant", "nearest input"),
                          ("teddybear", "sparsefusion"), ("all", "sparsefusion"), ("all", "EFT"),
                          ("all", "nearest input")]
    n, novel, every = rows[("hydrant", "sparsefusion")]
    assert n == 2 and novel == pytest.approx({"psnr": 18.0, "ssim": 0.65, "lpips": 0.375})
    assert every == pytest.approx({"psnr": 20.5, "ssim": 0.70, "lpips": 0.325})
    n, novel, _ = rows[("all", "sparsefusion")]
    assert n == 3 and novel["psnr"] == pytest.approx(61 / 3) and novel["lpips"] is None  # teddybear has none
    assert rows[("all", "EFT")][:2] == (1, {"psnr": 18.0, "ssim": 0.60, "lpips": 0.40})

    page = run_page(load_run(run), "run")
    assert "<td>all</td><td>sparsefusion</td><td class=\"num\">3</td><td class=\"num\">20.33</td>" in page
    assert '<td class="num" data-v="15.0">15.00</td>' in page  # the scene table's cells sort by data-v
    assert '<td class="num" data-v="">n/a</td>' in page  # n/a sorts last


def test_strings_from_files_are_escaped(run):
    record = load_run(run)[0]
    hostile = '<img src=x onerror="alert(1)">&'
    record.update(category=hostile, sequence=hostile, method=hostile, source_sequence=hostile,
                  input_views=[hostile], timings={hostile: 1.0}, baselines={hostile: {"psnr": 1.0}})
    page = run_page([record], hostile)
    assert hostile not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in page


def test_records_without_optional_fields_show_na(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "s.json").write_text(json.dumps({"sequence": "s", "category": "c", "psnr": 20.0,
                                                            "ssim": 0.5, "novel_views": {"psnr": "bad"}}))
    page = run_page(load_run(tmp_path), "run")
    assert page.count("n/a") >= 6 and "20.00" in page and "no files" not in page  # its metrics JSON is linked


def test_a_running_page_says_so_and_reloads(run):
    records = load_run(run)
    assert '<body data-running="1">' in run_page(records, "run", running=True)
    assert "<body>" in run_page(records, "run") and "run finished" in run_page(records, "run")


def test_evaluate_writes_the_page(run, capsys):
    evaluate_main([str(run)])
    assert (run / "index.html").is_file() and "index.html" in capsys.readouterr().out


def test_page_update_never_stops_a_run(tmp_path, capsys):
    assert update_run_page(tmp_path) is None
    assert capsys.readouterr().err.startswith("warning: run page not written: no per-scene metrics JSON")


# ---------------------------------------------------------------------------------------------------------
# A real browser: headless Chromium loads the page from disk, as a user opens it.

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
WINDOW = (1280, 2400)


def _chromium(tmp_path, url, *flags):
    """Return the stdout of headless Chromium opening url with flags; a fresh profile, no sandbox (CI runs as root)."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                           *flags, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _body_attributes(dom):
    return dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))


def _scene_order(dom):
    table = re.search(r'<table id="scenes">.*?</table>', dom, re.S).group(0)
    return re.findall(r'href="#scene-([^"]+)"', table)


# Appended to a copy of the page: records the scene order as loaded, then after one and two clicks on novel PSNR.
CLICKS = """<script>
const order = () => [...document.querySelectorAll('#scenes tbody a')].map(a => a.textContent).join(' ');
const psnr = document.querySelector('th[data-key=novel_psnr]'), seen = [order()];
psnr.click(); seen.push(order(), location.hash); psnr.click(); seen.push(order(), location.hash);
document.body.dataset.clicks = seen.join(',');
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_browser_loads_every_image_sorts_and_flags_a_missing_one(run, tmp_path):
    page = write_run_page(run).read_text()
    (run / "clicked.html").write_text(page.replace("</body>", CLICKS))
    dom = _chromium(tmp_path, (run / "clicked.html").as_uri() + "#sort=novel_lpips", "--dump-dom")
    body = _body_attributes(dom)
    n_images = 5 * len(SCENES) - 1  # five pictures a scene; one inputs strip was never written
    assert body["images"] == body["loaded"] == str(n_images) and 'data-broken="1"' not in dom
    assert body["clicks"].split(",") == [
        "hydrant_001_c2 hydrant_000_c2 teddybear_000_c2",  # #sort=novel_lpips: worst LPIPS first, n/a last
        "hydrant_001_c2 hydrant_000_c2 teddybear_000_c2", "#sort=novel_psnr:asc",  # a click: worst PSNR first
        "teddybear_000_c2 hydrant_000_c2 hydrant_001_c2", "#sort=novel_psnr:desc"]  # another: best first

    screenshot = tmp_path / "run_page.png"
    _chromium(tmp_path, (run / "index.html").as_uri() + "#sort=novel_psnr", f"--screenshot={screenshot}")
    picture = imageio.imread(screenshot)
    assert picture.shape[:2] == (WINDOW[1], WINDOW[0]) and picture.std() > 10  # a page, not a blank window

    (run / "render_gifs" / "hydrant_000_c2_circle.gif").unlink()  # the check finds a broken image
    dom = _chromium(tmp_path, (run / "index.html").as_uri(), "--dump-dom")
    assert dom.count('data-broken="1"') == 1
    assert "1 image(s) did not load: render_gifs/hydrant_000_c2_circle.gif" in dom

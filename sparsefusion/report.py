"""The run page: <run>/index.html, one static page of every scene's metrics, input views, GIFs and losses.

The page lives beside the files a run wrote (sparsefusion/reconstruct.py lists them) and reaches them
by relative links: no server, no network, inline CSS and a few lines of inline script that sort the
scene table (a metric's first click puts the worst scenes first) and flag images that fail to load.
Every string read from a file is HTML-escaped. Metrics: the main columns are the means over novel
views (the cameras that are not input views, as papers score); the means over all views (upstream's)
follow; baselines (EFT, VLDM, nearest input) appear wherever the run measured them.
"""

import html
import json
import math
import sys
import time
from pathlib import Path
from urllib.parse import quote

from sparsefusion.errors import UserError
from sparsefusion.evaluation import DECIMALS, METRICS, load_scene_records
from sparsefusion.outputs import write_text

PAGE_NAME = "index.html"
RELOAD_SECONDS = 60  # while a run goes on, its page reloads itself this often
# A scene's files, relative to the folder holding its metrics/ folder (reconstruct.py writes them).
SCENE_FILES = {
    "inputs": "log/{seq}_inputs.jpg",
    "gif": "render_gifs/{seq}.gif",
    "turntable": "render_gifs/{seq}_circle.gif",
    "loss": "log/{seq}_loss.jpg",
    "fusion_loss": "log/{seq}_fusionloss.jpg",
    "eft_grid": "log/{seq}_eft_grid.jpg",
    "metrics_json": "metrics/{seq}.json",
    "metrics_txt": "metrics/{seq}.txt",
    "mesh": "meshes/{seq}.ply",
    "nerf": "{seq}.pt",
}
# Pictures of a scene section, in order, with their captions.
FIGURES = (
    ("inputs", "input views"),
    ("gif", "ground truth | EFT | ours | ground-truth mask | our mask"),
    ("turntable", "turntable: ours | our mask"),
    ("loss", "context-view losses"),
    ("fusion_loss", "fusion loss"),
)
# Files a scene section links to, with their link texts.
LINKS = (("metrics_json", "metrics JSON"), ("metrics_txt", "metrics text"), ("mesh", "mesh (.ply)"),
         ("nerf", "NeRF (.pt)"), ("eft_grid", "EFT images"))
BASELINE_NAMES = {"eft": "EFT", "vldm": "VLDM", "nearest_input": "nearest input"}
HEADERS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}
# The order a metric's first click sorts in: its worst scenes first.
WORST_FIRST = {"psnr": "asc", "ssim": "asc", "lpips": "desc"}


def esc(value):
    """Return str(value) escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def number(value):
    """Return value as a float, or None when it is not a finite number (missing, null, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def scene_root(metrics_path):
    """Return the folder a scene's files are relative to: the parent of metrics/, else the JSON's own folder."""
    metrics_path = Path(metrics_path)
    return metrics_path.parent.parent if metrics_path.parent.name == "metrics" else metrics_path.parent


def scene_files(sequence, metrics_path, run_dir):
    """Return {kind: path relative to run_dir, POSIX} of the SCENE_FILES of a scene that exist on disk."""
    root = scene_root(metrics_path)
    found = {kind: root / pattern.format(seq=sequence) for kind, pattern in SCENE_FILES.items()}
    return {kind: path.relative_to(run_dir).as_posix() for kind, path in found.items() if path.is_file()}


def load_run(run_dir):
    """Return every scene record under run_dir (the whole metrics JSON plus "files"), by category and sequence."""
    run_dir = Path(run_dir)
    records = []
    for checked in load_scene_records(run_dir):
        record = json.loads(Path(checked["file"]).read_text())
        record["files"] = scene_files(checked["sequence"], checked["file"], run_dir)
        records.append(record)
    return sorted(records, key=lambda r: (str(r["category"]), str(r["sequence"])))


def view_metrics(result, views):
    """Return {"psnr", "ssim", "lpips"} (float or None) of a result: views 'novel' (its novel_views) or 'all'."""
    source = result.get("novel_views") if views == "novel" else result
    source = source if isinstance(source, dict) else {}
    return {metric: number(source.get(metric)) for metric in METRICS}


def scene_seconds(record):
    """Return the seconds a scene took (the sum of its timings), or None without timings."""
    timings = record.get("timings")
    values = [number(v) for v in timings.values()] if isinstance(timings, dict) else []
    return math.fsum(values) if values and None not in values else None


def input_text(record):
    """Return a scene's input views as text, e.g. '3, 7 of 12' ('n/a' when the record has none)."""
    inputs = record.get("input_views") if isinstance(record.get("input_views"), list) else []
    of = f" of {record['n_views']}" if "n_views" in record else ""
    return f"{', '.join(str(v) for v in inputs)}{of}" if inputs else "n/a"


def method_results(record):
    """Return [(method name, result)]: the scene's own result, then each baseline it measured."""
    baselines = record.get("baselines") if isinstance(record.get("baselines"), dict) else {}
    ours = [(str(record.get("method", "sparsefusion")), record)]
    return ours + [(BASELINE_NAMES.get(name, str(name)), result) for name, result in baselines.items()
                   if isinstance(result, dict)]


def mean_or_none(values):
    """Return the mean of values, or None if any is None (a group mean needs every scene) or there are none."""
    return None if not values or None in values else math.fsum(values) / len(values)


def group_means(records):
    """Return [(group, method, scenes, novel means, all-view means)]: per category, then 'all', per method.

    A method's row averages the scenes that measured it; a metric is None unless every one of them has it.
    """
    categories = sorted({str(r["category"]) for r in records})
    groups = [(c, [r for r in records if str(r["category"]) == c]) for c in categories] + [("all", records)]
    rows = []
    for group, members in groups:
        results = [pair for record in members for pair in method_results(record)]
        for method in dict.fromkeys(name for name, _ in results):
            chosen = [result for name, result in results if name == method]
            means = {views: {m: mean_or_none([view_metrics(r, views)[m] for r in chosen]) for m in METRICS}
                     for views in ("novel", "all")}
            rows.append((group, method, len(chosen), means["novel"], means["all"]))
    return rows


def format_metric(value, metric):
    """Return a metric's table text: fixed decimals, or 'n/a'."""
    return "n/a" if value is None else f"{value:.{DECIMALS[metric]}f}"


def format_seconds(seconds):
    """Return a duration as '42 s', '12 min 5 s' or '2 h 3 min'; 'n/a' for None."""
    if seconds is None:
        return "n/a"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def link(path):
    """Return an href/src attribute value for a relative POSIX path: URL-quoted, then escaped."""
    return esc(quote(path))


def anchor(sequence):
    """Return the id of a scene's section."""
    return esc(f"scene-{sequence}")


def metric_cells(metrics, sort_value=False):
    """Return the <td>s of PSNR, SSIM, LPIPS; with sort_value each carries data-v (empty for n/a)."""
    cells = []
    for metric in METRICS:
        value = metrics[metric]
        data = f' data-v="{"" if value is None else repr(value)}"' if sort_value else ""
        cells.append(f'<td class="num"{data}>{format_metric(value, metric)}</td>')
    return "".join(cells)


def metric_headers(prefix=None, column=0):
    """Return the <th>s of PSNR, SSIM, LPIPS; with a prefix they sort the scene table by key prefix_metric,
    from body column `column` on."""
    if prefix is None:
        return "".join(f"<th>{HEADERS[m]}</th>" for m in METRICS)
    return "".join(f'<th data-key="{prefix}_{m}" data-col="{column + i}" data-first="{WORST_FIRST[m]}">'
                   f"{HEADERS[m]}</th>" for i, m in enumerate(METRICS))


def means_table(records):
    """Return the <table> of per-category and overall means over scenes, one row per method."""
    rows = []
    for group, method, scenes, novel, every in group_means(records):
        cls = ' class="overall"' if group == "all" else ""
        rows.append(f"<tr{cls}><td>{esc(group)}</td><td>{esc(method)}</td><td class=\"num\">{scenes}</td>"
                    f"{metric_cells(novel)}{metric_cells(every)}</tr>")
    return ('<table id="means"><thead><tr><th rowspan="2">category</th><th rowspan="2">method</th>'
            '<th rowspan="2">scenes</th><th colspan="3">novel views</th><th colspan="3">all views</th></tr>'
            f"<tr>{metric_headers()}{metric_headers()}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def scene_row(record):
    """Return a scene's <tr> in the scene table; every cell carries data-v, the value it sorts by."""
    sequence, category = str(record["sequence"]), str(record["category"])
    inputs = record.get("input_views") if isinstance(record.get("input_views"), list) else []
    seconds = scene_seconds(record)
    return (f'<tr><td data-v="{esc(category)}">{esc(category)}</td>'
            f'<td data-v="{esc(sequence)}"><a href="#{anchor(sequence)}">{esc(sequence)}</a></td>'
            f'<td data-v="{len(inputs)}">{esc(input_text(record))}</td>'
            f"{metric_cells(view_metrics(record, 'novel'), True)}{metric_cells(view_metrics(record, 'all'), True)}"
            f'<td class="num" data-v="{"" if seconds is None else repr(seconds)}">{format_seconds(seconds)}</td></tr>')


def scenes_table(records):
    """Return the sortable <table> of every scene; a header's data-col is the body column it sorts by."""
    text = [("category", "category"), ("sequence", "scene"), ("inputs", "input views")]
    headers = "".join(f'<th rowspan="2" data-key="{key}" data-col="{i}" data-first="asc">{name}</th>'
                      for i, (key, name) in enumerate(text))
    return ('<table id="scenes"><thead><tr>' + headers + '<th colspan="3">novel views</th>'
            '<th colspan="3">all views</th><th rowspan="2" data-key="time" data-col="9" data-first="desc">time</th>'
            f'</tr><tr>{metric_headers("novel", 3)}{metric_headers("all", 6)}</tr></thead>'
            f"<tbody>{''.join(scene_row(r) for r in records)}</tbody></table>")


def figure(files, kind, caption):
    """Return a <figure> of one scene picture, or a note where the file is missing."""
    if kind not in files:
        return f'<figure class="missing"><div>not written</div><figcaption>{esc(caption)}</figcaption></figure>'
    return (f'<figure><img loading="lazy" src="{link(files[kind])}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def scene_section(record):
    """Return a scene's <section>: facts, per-method metrics, pictures, links and timings."""
    sequence, files = str(record["sequence"]), record.get("files", {})
    facts = [str(record["category"])]
    if "source_sequence" in record:
        facts.append(f"source sequence {record['source_sequence']}")
    facts += [f"input views {input_text(record)}", format_seconds(scene_seconds(record))]
    rows = "".join(f"<tr><td>{esc(name)}</td>{metric_cells(view_metrics(result, 'novel'))}"
                   f"{metric_cells(view_metrics(result, 'all'))}</tr>" for name, result in method_results(record))
    metrics = ('<table class="scene-metrics"><thead><tr><th rowspan="2">method</th><th colspan="3">novel views</th>'
               f'<th colspan="3">all views</th></tr><tr>{metric_headers()}{metric_headers()}</tr></thead>'
               f"<tbody>{rows}</tbody></table>")
    captions = dict(FIGURES, inputs=f"input views {input_text(record)}")
    figures = "".join(figure(files, kind, captions[kind]) for kind, _ in FIGURES)
    links = " · ".join(f'<a href="{link(files[kind])}">{text}</a>' for kind, text in LINKS if kind in files)
    timings = record.get("timings") if isinstance(record.get("timings"), dict) else {}
    timing_text = " · ".join(f"{esc(str(name).removesuffix('_s').replace('_', ' '))} {format_seconds(number(value))}"
                             for name, value in timings.items())
    return (f'<section id="{anchor(sequence)}"><h2>{esc(sequence)}</h2><p class="facts">{esc(" · ".join(facts))}</p>'
            f'{metrics}<div class="figures">{figures}</div><p class="links">{links or "no files"}</p>'
            + (f'<p class="timings">time: {timing_text}</p>' if timing_text else "") + "</section>")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.overall td { font-weight: bold; }
#scenes th[data-key] { cursor: pointer; user-select: none; }
#scenes th[aria-sort=ascending]::after { content: " ▲"; }
#scenes th[aria-sort=descending]::after { content: " ▼"; }
#scenes tbody tr:hover { background: #f7f7ff; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; }
.facts, .links, .timings { margin: 0.3em 0; color: #444; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; }
figure img { display: block; height: 160px; max-width: 100%; object-fit: contain; object-position: left; }
figure.missing div { width: 160px; height: 160px; line-height: 160px; border: 1px dashed #aaa; color: #888;
                      text-align: center; }
figcaption { color: #555; font-size: 12px; }
#broken { color: #b00; }
"""

# Flags images that fail to load (error events do not bubble, so listen in the capture phase); sorts the
# scene table by a header's column, worst first on the first click; #sort=KEY[:asc|desc] picks the order.
SCRIPT_HEAD = """
document.addEventListener('error', e => {
  if (e.target.tagName !== 'IMG') return;
  e.target.dataset.broken = '1';
  const note = document.getElementById('broken'), broken = document.querySelectorAll('img[data-broken]');
  const names = [...broken].map(i => i.getAttribute('src')).join(', ');
  note.textContent = broken.length + ' image(s) did not load: ' + names;
  note.hidden = false;
}, true);
"""
SCRIPT_BODY = """
const table = document.getElementById('scenes'), heads = [...table.querySelectorAll('th[data-key]')];
function sortScenes(key, order) {
  const th = heads.find(h => h.dataset.key === key);
  if (!th) return;
  const sign = order === 'desc' ? -1 : 1, body = table.tBodies[0], value = row => row.cells[th.dataset.col].dataset.v;
  const rows = [...body.rows].sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === '' || y === '') return (x === '') - (y === '');  // n/a last, either way
    const numbers = [Number(x), Number(y)];
    return sign * (numbers.some(isNaN) ? x.localeCompare(y, undefined, {numeric: true}) : numbers[0] - numbers[1]);
  });
  rows.forEach(row => body.appendChild(row));
  heads.forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', order === 'desc' ? 'descending' : 'ascending');
}
heads.forEach(th => th.addEventListener('click', () => {
  const current = th.getAttribute('aria-sort'), first = th.dataset.first;
  const order = current ? (current === 'ascending' ? 'desc' : 'asc') : first;
  sortScenes(th.dataset.key, order);
  location.replace('#sort=' + th.dataset.key + ':' + order);
}));
const asked = location.hash.match(/^#sort=(\\w+)(?::(asc|desc))?$/);
const askedHead = asked && heads.find(h => h.dataset.key === asked[1]);
if (askedHead) sortScenes(asked[1], asked[2] || askedHead.dataset.first);
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
if (document.body.dataset.running) setTimeout(() => location.reload(), RELOAD_MS);
"""


def run_page(records, title, running=False, updated=None):
    """Return the run page's HTML: means per category and overall, the sortable scene table, a section per scene.

    Args:
        records: scene records as load_run returns them (metrics JSON plus "files": relative paths).
        title: the run's name (its folder), shown escaped.
        running: the run goes on: the page says so and reloads itself every RELOAD_SECONDS.
        updated: text saying when the page was written, or None.
    """
    state = f"run in progress: this page reloads every {RELOAD_SECONDS} s" if running else "run finished"
    body = '<body data-running="1">' if running else "<body>"
    when = f" · written {esc(updated)}" if updated else ""
    categories = len({str(r["category"]) for r in records})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}: SparseFusion run</title><style>{STYLE}</style><script>{SCRIPT_HEAD}</script></head>\n"
        f"{body}<h1>SparseFusion run: {esc(title)}</h1>"
        f"<p>{len(records)} scene(s) in {categories} categor{'y' if categories == 1 else 'ies'} · {state}{when}</p>"
        '<p id="broken" hidden></p>'
        "<h2>Means over scenes</h2><p>Novel views are the cameras that are not input views (as papers score); "
        "all views are upstream's means. LPIPS is n/a where a scene was scored without it.</p>"
        f"{means_table(records)}"
        "<h2>Scenes</h2><p>Click a column to sort; a metric's first click shows the worst scenes first.</p>"
        f"{scenes_table(records)}\n{''.join(scene_section(r) for r in records)}\n"
        f"<script>{SCRIPT_BODY.replace('RELOAD_MS', str(RELOAD_SECONDS * 1000))}</script></body></html>\n"
    )


def write_run_page(run_dir, running=False):
    """Write run_dir/index.html atomically from the scene records under run_dir; return its path."""
    run_dir = Path(run_dir)
    page = run_page(load_run(run_dir), run_dir.resolve().name, running, time.strftime("%Y-%m-%d %H:%M:%S"))
    return write_text(page, run_dir / PAGE_NAME)


def update_run_page(run_dir, running=False):
    """write_run_page, but a problem with the run's files is a one-line warning: the page never stops a run."""
    try:
        return write_run_page(run_dir, running)
    except (UserError, OSError, ValueError) as err:
        print(f"warning: run page not written: {err}", file=sys.stderr)
        return None

"""Per-category and overall metric tables of a run, from the per-scene metrics JSON files it wrote.

A per-scene file is a JSON object with at least {"sequence": str, "category": str, "psnr": float,
"ssim": float} and optionally "lpips": float or null. Every table entry is a mean over scenes,
as papers report; the overall row weighs each scene once, whatever its category.
"""

import json
import math
from pathlib import Path

from sparsefusion.errors import UserError
from sparsefusion.outputs import write_json, write_text

METRICS = ("psnr", "ssim", "lpips")
# Table headers and decimals of each metric.
HEADERS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}
DECIMALS = {"psnr": 2, "ssim": 3, "lpips": 3}
SUMMARY_NAME = "metrics_summary"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scene_record(data, path):
    """Return {"sequence", "category", "psnr", "ssim", "lpips", "file"} of one per-scene JSON object, checked."""
    missing = [key for key in ("sequence", "category", "psnr", "ssim") if key not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: a per-scene metrics file needs sequence, category, psnr, ssim")
    lpips = data.get("lpips")
    if not all(_is_number(data[key]) for key in ("psnr", "ssim")) or not (lpips is None or _is_number(lpips)):
        raise UserError(f"{path}: psnr and ssim must be numbers and lpips a number or null")
    record = {key: data[key] for key in ("sequence", "category", "psnr", "ssim")}
    return {**record, "lpips": lpips, "file": str(path)}


def load_scene_records(run_dir):
    """Return the per-scene records of every JSON file under run_dir (recursively) that holds a "sequence".

    JSON files without "sequence" (configs, earlier summaries) and hidden files (unfinished writes) are skipped.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the folder a run wrote (e.g. output/demo)")
    records, seen = [], {}
    for path in sorted(p for p in run_dir.rglob("*.json") if not p.name.startswith(".")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({err}); delete it or re-run its scene") from err
        if not isinstance(data, dict) or "sequence" not in data:
            continue
        record = scene_record(data, path)
        key = (record["category"], record["sequence"])
        if key in seen:
            raise UserError(f"scene {key[1]} ({key[0]}) appears twice: {seen[key]} and {path}; keep one")
        seen[key] = path
        records.append(record)
    if not records:
        raise UserError(f"no per-scene metrics JSON (with a \"sequence\" field) under {run_dir}; "
                        "pass the folder a finished run wrote (e.g. output/demo)")
    return records


def mean_over_scenes(records):
    """Return {"scenes": n, "psnr", "ssim", "lpips"}: means over records; "lpips" is None unless every scene has it."""
    means = {key: math.fsum(r[key] for r in records) / len(records) for key in ("psnr", "ssim")}
    lpips = [r["lpips"] for r in records]
    means["lpips"] = None if None in lpips else math.fsum(lpips) / len(lpips)
    return {"scenes": len(records), **means}


def summarize(records):
    """Return {"categories": {category: means}, "overall": means, "per_scene": records sorted by category, sequence}."""
    records = sorted(records, key=lambda r: (r["category"], r["sequence"]))
    categories = sorted({r["category"] for r in records})
    return {
        "categories": {c: mean_over_scenes([r for r in records if r["category"] == c]) for c in categories},
        "overall": mean_over_scenes(records),
        "per_scene": records,
    }


def _cell(value, metric):
    return "n/a" if value is None else f"{value:.{DECIMALS[metric]}f}"


def _table(header, rows, text_columns):
    """Markdown table; the first text_columns columns align left, the numbers right."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summary_table(summary):
    """Return the Markdown table of per-category means and the overall mean, one row each."""
    rows = [[c, str(m["scenes"])] + [_cell(m[k], k) for k in METRICS] for c, m in summary["categories"].items()]
    overall = summary["overall"]
    rows.append(["**all**", str(overall["scenes"])] + [_cell(overall[k], k) for k in METRICS])
    return _table(["category", "scenes"] + [HEADERS[k] for k in METRICS], rows, text_columns=1)


def scene_table(summary):
    """Return the Markdown table of every scene's metrics."""
    rows = [[r["category"], r["sequence"]] + [_cell(r[k], k) for k in METRICS] for r in summary["per_scene"]]
    return _table(["category", "sequence"] + [HEADERS[k] for k in METRICS], rows, text_columns=2)


def summary_markdown(summary, run_dir):
    """Return the Markdown report: the summary table, then the per-scene table."""
    overall = summary["overall"]
    return (
        f"# Metrics of {run_dir}\n\n"
        f"Means over scenes: {overall['scenes']} scenes in {len(summary['categories'])} categories. "
        "LPIPS is n/a where a scene was evaluated without it.\n\n"
        f"{summary_table(summary)}\n\n## Per scene\n\n{scene_table(summary)}\n"
    )


def evaluate_run(run_dir, out_prefix=None):
    """Return (summary, json path, markdown path) after writing the tables of run_dir's per-scene metrics.

    The outputs go to out_prefix + ".json" / ".md", by default run_dir/metrics_summary.*.
    """
    summary = summarize(load_scene_records(run_dir))
    prefix = Path(out_prefix) if out_prefix is not None else Path(run_dir) / SUMMARY_NAME
    json_path = write_json({"run": str(run_dir), **summary}, f"{prefix}.json")
    md_path = write_text(summary_markdown(summary, run_dir), f"{prefix}.md")
    return summary, json_path, md_path

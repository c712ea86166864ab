"""Tables of a run's metrics: python evaluate.py output/demo [--out PREFIX].

Reads every per-scene metrics JSON under the run folder, prints per-category and overall means
over scenes, and writes them as JSON and Markdown (default: <run>/metrics_summary.json|.md), and
the run's page <run>/index.html (sparsefusion/report.py).
"""

import argparse

from sparsefusion.errors import exit_on_user_error
from sparsefusion.evaluation import evaluate_run, summary_table
from sparsefusion.report import write_run_page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="folder a run wrote, searched recursively for per-scene JSON (e.g. output/demo)")
    parser.add_argument("--out", default=None, help="output path without extension (default: <run_dir>/metrics_summary)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        summary, json_path, md_path = evaluate_run(args.run_dir, args.out)
        print(summary_table(summary))
        page = write_run_page(args.run_dir)
        print(f"wrote {json_path}, {md_path} and {page}")


if __name__ == "__main__":
    main()

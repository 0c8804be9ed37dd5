"""``skillgraft report``: report.md, plots and the recommended recipe of a sweep directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="write report.md and plots for a sweep directory",
                        description="Write SWEEP/report.md, its PNG plots and recommended_recipe.yaml from SWEEP/sweep.db.")
    rp.add_argument("sweep_dir", help="a directory written by skillgraft sweep")
    rp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sweep.analysis import load_results  # matplotlib: imported when the command runs
    from ..sweep.report import summary_lines, write_report

    path = write_report(args.sweep_dir)
    for line in summary_lines(load_results(args.sweep_dir)):
        print(line)
    print(f"report: {path}")
    return 0

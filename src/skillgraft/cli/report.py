"""``skillgraft report``: write report.md and plots for a sweep directory.

Write SWEEP/report.md, its PNG plots and recommended_recipe.yaml from SWEEP/sweep.db.
"""

from __future__ import annotations

import argparse

from .args import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", run, __doc__)
    p.add_argument("sweep_dir", help="a directory written by skillgraft sweep")


def run(args: argparse.Namespace) -> int:
    from ..sweep.analysis import load_results  # deferred: torch, keeps --help fast
    from ..sweep.report import summary_lines, write_report  # deferred: torch, keeps --help fast

    path = write_report(args.sweep_dir)
    for line in summary_lines(load_results(args.sweep_dir)):
        print(line)
    print(f"report: {path}")
    return 0

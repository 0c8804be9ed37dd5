"""``skillgraft demo``: inject each micro-world expert into the micro-world VLM and show the effect."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_verbosity, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="inject each micro-world expert into the micro-world VLM and show the effect")
    p.add_argument("--out", default="demo", help="where report.md and the plot go (default ./demo)")
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..microworld.demo import run_demo  # torch and transformers: imported when the command runs

    run_demo(Path(args.out), progress=show_progress(args))
    return 0

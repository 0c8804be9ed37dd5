"""``skillgraft demo``: inject each micro-world expert into the micro-world VLM and show the effect."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_command, add_verbosity, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", run, __doc__)
    p.add_argument("--out", default="demo", help="where report.md and the plot go (default ./demo)")
    add_verbosity(p)


def run(args: argparse.Namespace) -> int:
    from ..microworld.demo import run_demo  # deferred: torch and transformers, keeps --help fast

    run_demo(Path(args.out), progress=show_progress(args))
    return 0

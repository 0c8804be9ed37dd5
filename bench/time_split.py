"""Where a merge's time goes: the busy seconds of reading (the reader thread), merging (the merge
workers: conversion to float32, the method's arithmetic, norm statistics and the non-finite check)
and writing (the writer thread), against the merge's wall time. The three overlap, so a stage whose
busy time is close to the wall time is the one the merge waits on.

    python bench/scale.py /tmp/sg-scale --sizes 72b --skip-mergekit     # builds /tmp/sg-scale/72b once
    python bench/time_split.py /tmp/sg-scale/72b-ta.yaml                  # any recipe scale.py wrote

Each stage is wrapped with a timer in this process; the merge runs as ``skillgraft inject`` does.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from skillgraft import engine, sources
from skillgraft.cli import main as cli_main
from skillgraft.io import writer

from timers import add_timers

STAGES = [
    (sources.FileSource, "read", "reading (reader thread)"),
    (engine, "_apply_and_check", "merging (workers)"),
    (writer.ShardedWriter, "write_block", "writing (writer thread)"),
    (writer.ShardedWriter, "finish", "closing the shards"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    args = ap.parse_args()
    busy = add_timers(STAGES)
    with tempfile.TemporaryDirectory(prefix="sg-time-split-") as tmp:
        out = Path(tmp) / "out"
        t = time.perf_counter()
        rc = cli_main(["inject", "--recipe", str(args.recipe), "-o", str(out), "-q", "--force"])
        wall = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
    print(f"{args.recipe.name}: wall {wall:.1f} s (exit {rc}), of it busy:")
    for _, _, label in STAGES:
        print(f"  {label:28} {busy[label]:7.1f} s  ({100 * busy[label] / wall:5.1f}% of wall)")


if __name__ == "__main__":
    main()

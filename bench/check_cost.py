"""What the safety checks cost inside one merge: the strict safetensors header parser, the pre-merge
checks (unrelated weights, tokenizers) and the per-block non-finite check, timed where they run in a
normal ``skillgraft inject`` (TA, inject mode, default settings) and given as a share of its wall time.

    python bench/make_synthetic.py /tmp/skillgraft-bench      # once: the 0.968B bf16 triple
    python bench/check_cost.py /tmp/skillgraft-bench [--repeat 3] [--ablate 5]

Each check is wrapped with a timer in this process (nothing is switched off), so the figures come from
the same runs as the wall time. The non-finite check runs beside reading and writing in the merge
workers, so its busy time overstates what it adds to the wall; ``--ablate N`` measures that directly:
N more merges with it and N without, alternating, and their median wall times.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from timers import add_timers

from skillgraft import engine, pipeline
from skillgraft.cli import main as cli_main
from skillgraft.io import reader

CHECKS = [
    (reader, "parse", "safetensors header parser"),
    (pipeline, "unrelated_weights_check", "unrelated-weights check"),
    (pipeline, "check_vocabularies", "tokenizer check"),
    (engine, "_check_finite", "non-finite check (every block)"),
]


def merge(work: Path, out: Path) -> float:
    """One TA inject of the triple in ``work`` into ``out`` as the command line runs it; its wall seconds."""
    argv = ["inject", str(work / "vlm"), str(work / "expert"), "--base", str(work / "base"), "--scale", "0.8",
            "-o", str(out), "-q", "--force"]
    t = time.perf_counter()
    if cli_main(argv) != 0:
        raise SystemExit("the merge failed")
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="directory holding vlm/, base/ and expert/ (bench/make_synthetic.py)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ablate", type=int, default=0, help="also time N merges with and N without the non-finite check")
    args = ap.parse_args()
    busy = add_timers(CHECKS)
    with tempfile.TemporaryDirectory(prefix="sg-check-cost-") as tmp:
        walls = [merge(args.work, Path(tmp) / "out") for _ in range(args.repeat)]
    busy = dict(busy)  # the checks' times in those runs (the ablation below runs more merges)
    ablation: dict[str, list[float]] = {"with": [], "without": []}
    checked = engine._check_finite
    with tempfile.TemporaryDirectory(prefix="sg-check-cost-") as tmp:
        for _ in range(args.ablate):
            for mode in ("with", "without"):
                engine._check_finite = checked if mode == "with" else (lambda *a, **k: None)
                ablation[mode].append(merge(args.work, Path(tmp) / "out"))
        engine._check_finite = checked
    total = sum(walls)
    print(f"TA inject, {args.repeat} runs: wall {', '.join(f'{w:.2f}' for w in walls)} s")
    for label, seconds in busy.items():
        print(f"  {label:34} {seconds / args.repeat * 1000:9.1f} ms per run  {100 * seconds / total:5.2f}% of wall")
    checks = sum(busy.values())
    print(f"  {'all checks':34} {checks / args.repeat * 1000:9.1f} ms per run  {100 * checks / total:5.2f}% of wall")
    if args.ablate:
        on, off = (statistics.median(ablation[m]) for m in ("with", "without"))
        print(f"non-finite check on/off, {args.ablate} merges each, medians: {on:.2f} s with, {off:.2f} s without "
              f"({100 * (on - off) / off:+.1f}%)")


if __name__ == "__main__":
    main()

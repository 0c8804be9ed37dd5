"""What the safety checks cost inside one merge: the strict safetensors header parser, the pre-merge
checks (unrelated weights, tokenizers) and the per-block non-finite check, timed where they run in a
normal ``skillgraft inject`` (TA, inject mode, default settings) and given as a share of its wall time.

    python bench/make_synthetic.py /tmp/skillgraft-bench      # once: the 0.968B bf16 triple
    python bench/check_cost.py /tmp/skillgraft-bench [--repeat 3]

Each check is wrapped with a timer in this process (nothing is switched off), so the figures come from
the same runs as the wall time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from skillgraft import engine, pipeline
from skillgraft.cli import main as cli_main
from skillgraft.io import reader

from timers import add_timers

CHECKS = [
    (reader, "parse", "safetensors header parser"),
    (pipeline, "unrelated_weights_check", "unrelated-weights check"),
    (pipeline, "check_vocabularies", "tokenizer check"),
    (engine, "_check_finite", "non-finite check (every block)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="directory holding vlm/, base/ and expert/ (bench/make_synthetic.py)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    busy = add_timers(CHECKS)
    walls = []
    with tempfile.TemporaryDirectory(prefix="sg-check-cost-") as tmp:
        out = Path(tmp) / "out"
        for _ in range(args.repeat):
            w = args.work
            argv = ["inject", str(w / "vlm"), str(w / "expert"), "--base", str(w / "base"), "--scale", "0.8",
                    "-o", str(out), "-q", "--force"]
            t = time.perf_counter()
            if cli_main(argv) != 0:
                raise SystemExit("the merge failed")
            walls.append(time.perf_counter() - t)
            shutil.rmtree(out)
    total = sum(walls)
    print(f"TA inject, {args.repeat} runs: wall {', '.join(f'{w:.2f}' for w in walls)} s")
    for label, seconds in busy.items():
        print(f"  {label:34} {seconds / args.repeat * 1000:9.1f} ms per run  {100 * seconds / total:5.2f}% of wall")
    checks = sum(busy.values())
    print(f"  {'all checks':34} {checks / args.repeat * 1000:9.1f} ms per run  {100 * checks / total:5.2f}% of wall")


if __name__ == "__main__":
    main()

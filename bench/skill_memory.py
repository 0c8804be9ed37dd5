"""Peak memory of `skillgraft skill extract` against `skillgraft inject` on the ~1B synthetic triple.

Builds the triple once (bench/make_synthetic.py) unless it is there, then runs each command in a
child process and prints its wall time, peak RSS (ru_maxrss) and output size. The inject run
(TA, inject mode) is the bound a skill extraction must stay within; injecting the extracted
skills (no base read) is measured too.

    python bench/skill_memory.py /tmp/sg-bench [--formats full,lowrank,bitdelta,sparse] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_synthetic  # noqa: E402

FORMAT_ARGS = {
    "full": [],
    "lowrank": ["--rank", "64", "--dtype", "bfloat16"],
    "bitdelta": ["--dtype", "bfloat16"],
    "sparse": ["--density", "0.03", "--dtype", "bfloat16"],
}


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process (its stdout discarded)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--formats", default="full,lowrank,bitdelta,sparse")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    d = {k: args.work / k for k in ("base", "expert", "vlm")}
    if not all((x / "config.json").is_file() for x in d.values()):
        t = time.perf_counter()
        make_synthetic.main([str(args.work)])
        print(f"built synthetic triple in {time.perf_counter() - t:.0f} s")
    sg = [sys.executable, "-m", "skillgraft"]
    print(f"{'command':36} {'wall s':>8} {'peak RSS GiB':>13} {'output GB':>10}")
    out = args.work / "out-inject"
    wall, rss = run_child([*sg, "inject", str(d["vlm"]), str(d["expert"]), "--base", str(d["base"]), "-o", str(out),
                           "--force", "-q"])
    print(f"{'inject VLM EXPERT --base BASE (ta)':36} {wall:8.1f} {rss:13.2f} {du(out):10.3f}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    for fmt in args.formats.split(","):
        skill = args.work / f"skill-{fmt}"
        wall, rss = run_child([*sg, "skill", "extract", str(d["expert"]), "--base", str(d["base"]), "--format", fmt,
                               *FORMAT_ARGS[fmt], "-o", str(skill), "--force", "-q"])
        label = " ".join(["skill extract", fmt, *FORMAT_ARGS[fmt]])
        print(f"{label:36} {wall:8.1f} {rss:13.2f} {du(skill):10.3f}", flush=True)
        out = args.work / f"out-{fmt}"
        wall, rss = run_child([*sg, "inject", str(d["vlm"]), str(skill), "-o", str(out), "--force", "-q"])
        print(f"{'  inject VLM SKILL (no base)':36} {wall:8.1f} {rss:13.2f} {du(out):10.3f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(skill, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Peak memory of `skillgraft inject` on a synthetic ~1B-parameter bf16 checkpoint (a script, not a test).

Builds the synthetic triple once (bench/make_synthetic.py), runs the CLI in a child process for each
method and prints wall time and the child's peak RSS (ru_maxrss), next to the output shard size.

    python bench/peak_memory.py /tmp/sg-bench [--methods ta,ties,dare_ties] [--shard-size 2GB] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_synthetic  # noqa: E402

from skillgraft.io.reader import CheckpointReader  # noqa: E402
from skillgraft.io.writer import parse_size  # noqa: E402


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--methods", default="ta,ties,dare_ties")
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    dirs = {k: args.work / k for k in ("base", "expert", "vlm")}
    if not all((d / "config.json").is_file() for d in dirs.values()):
        t = time.perf_counter()
        make_synthetic.main([str(args.work)])
        print(f"built synthetic triple in {time.perf_counter() - t:.0f} s")
    reader = CheckpointReader(dirs["vlm"])
    n = sum(reader.nbytes(x) // reader.dtype(x).itemsize for x in reader.names)
    print(f"{n / 1e9:.2f}B parameters per checkpoint, bf16; output shard size {args.shard_size}")
    print(f"{'method':10} {'wall s':>8} {'peak RSS GiB':>13} {'budget GiB (2 + shard)':>23}")
    budget = 2 + parse_size(args.shard_size) / 2**30
    for method in args.methods.split(","):
        out = args.work / f"out-{method}"
        cmd = [sys.executable, "-m", "skillgraft", "inject", str(dirs["vlm"]), str(dirs["expert"]),
               "--base", str(dirs["base"]), "--method", method, "--density", "0.5" if method != "ta" else "1",
               "--shard-size", args.shard_size, "--device", args.device, "-o", str(out), "--force", "-q"]
        wall, rss = run_child(cmd)
        print(f"{method:10} {wall:8.1f} {rss:13.2f} {budget:23.2f}")
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

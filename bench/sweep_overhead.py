"""Sweep overhead: a 16-point scale sweep on the micro-world vs its 16 evaluations alone.

    python bench/sweep_overhead.py [--zoo DIR] [--expert expert-multilingual] [--limit N] [--streaming]

Prints, for the in-place sweep (the default path when the VLM fits in memory):

    evals alone   16 evaluations of the VLM as loaded (and, separately, load + 17 evaluations:
                  the 16 points plus the baseline a sweep needs for retention)
    sweep         `run_sweep` wall time: load, task-vector cache, baseline, 16 x (apply, evaluate,
                  restore), SQLite writes (report not included)
    ratio         sweep / 16 evaluations alone   (target: at most 1.3)
    per point     sum(total_s) / sum(eval_s) over the 16 trials (apply + restore overhead only)

With --streaming, also the fallback path (each point merged to a temporary checkpoint and loaded
by the evaluator) for comparison.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", help="micro-world zoo directory (default: the shipped zoo)")
    ap.add_argument("--expert", default="expert-multilingual")
    ap.add_argument("--limit", type=int, default=None, help="items per scenario (default: all)")
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--streaming", action="store_true", help="also time the checkpoint-per-point fallback")
    ap.add_argument("--repeat", type=int, default=2, help="take the fastest of this many runs of each (default 2)")
    args = ap.parse_args()

    import torch

    from skillgraft.evaluate.base import MicroworldEvaluator
    from skillgraft.recipe import ExpertSpec, Recipe
    from skillgraft.microworld.scenarios import scenarios_taught
    from skillgraft.sweep.objective import Objective
    from skillgraft.sweep.runner import SweepConfig, run_sweep
    from skillgraft.sweep.space import build_space

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.zoo:
        path = lambda n: str(Path(args.zoo) / n)  # noqa: E731
    else:
        from skillgraft.microworld.zoo import zoo_path

        path = lambda n: str(zoo_path(n))  # noqa: E731
    ev = MicroworldEvaluator(limit=args.limit)
    n = args.points
    step = 1.5 / (n - 1)

    def evals_alone() -> tuple[float, float]:
        """(load + n + 1 evaluations, n evaluations only) of the VLM as loaded."""
        t0 = time.perf_counter()
        model, proc = ev.load(path("vlm"))
        ev.evaluate_loaded(model, proc)
        t1 = time.perf_counter()
        for _ in range(n):
            ev.evaluate_loaded(model, proc)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    def sweep(inplace: str) -> tuple[float, float]:
        out = Path(tempfile.mkdtemp(prefix="sg-bench-sweep-"))
        try:
            recipe = Recipe(vlm=path("vlm"), base=path("base"), experts=[ExpertSpec(model=path(args.expert))])
            cfg = SweepConfig(recipe, build_space(["ta"], [f"scale=0:1.5:{step:.10g}"], [args.expert]), ev.spec(),
                              Objective(scenarios_taught([path(args.expert)]) or ["cross_lingual"]), inplace=inplace,
                              report=False)
            t = time.perf_counter()
            res = run_sweep(cfg, out / "s", log=None)
            wall = time.perf_counter() - t
            assert res.computed == n, res
            from skillgraft.sweep.analysis import load_results

            trials = load_results(out / "s").trials
            per_point = sum(x.timings["total_s"] for x in trials) / sum(x.timings["eval_s"] for x in trials)
            return wall, per_point
        finally:
            shutil.rmtree(out, ignore_errors=True)

    runs_alone, runs_sweep, runs_stream = [], [], []
    for _ in range(args.repeat):  # interleaved, so a busy machine slows both sides alike
        runs_alone.append(evals_alone())
        runs_sweep.append(sweep("always"))
        if args.streaming:
            runs_stream.append(sweep("never"))
    alone, only_n = min(runs_alone)
    wall, per_point = min(runs_sweep)
    print(f"{n}-point scale sweep, micro-world, limit={args.limit or 'all'}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeat}")
    print(f"evals alone: load + {n + 1} evaluations {alone:8.2f} s;  {n} evaluations only {only_n:8.2f} s")
    print(f"in-place sweep (load, cache, baseline, {n} points, store): {wall:8.2f} s")
    print(f"  ratio vs load + {n + 1} evaluations: {wall / alone:.3f}")
    print(f"  ratio vs {n} evaluations only:       {wall / only_n:.3f}   (target: at most 1.3)")
    print(f"  per point (apply+eval+restore / eval): {per_point:.3f}")
    if runs_stream:
        wall_s, per_point_s = min(runs_stream)
        print(f"streaming sweep (checkpoint per point): {wall_s:8.2f} s   ratio vs {n} evaluations {wall_s / only_n:.3f}"
              f"   per point {per_point_s:.3f}")


if __name__ == "__main__":
    main()

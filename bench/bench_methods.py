"""Time skillgraft against mergekit on a synthetic ~1B-parameter bf16 Llama triple, and the I/O floor.

For each method (default ``ta``, ``ties``, ``dare_ties``) the same merge runs in both tools, in
separate child processes, on the same machine and dtype: mergekit's ``base_model: base``,
``models: [vlm, expert]`` and skillgraft's ``mode: symmetric`` (mergekit's semantics: the VLM's delta
is one more task vector; TIES with ``normalize: true`` in both; DARE with each tool's default
rescale). Wall time and peak RSS are measured
per child (``os.wait4``'s ``ru_maxrss``). The floor is ``bench/floor.py``: read every input once and
write one output of the same size. The page cache is warmed before each run so every tool reads
from memory alike.

    python bench/make_synthetic.py /tmp/skillgraft-bench          # once, ~5.8 GB
    python bench/bench_methods.py /tmp/skillgraft-bench [--device cuda] [--json out.json]

mergekit is found as ``--mergekit PATH``, else ``mergekit-yaml`` next to this Python, on PATH, or in
``.venv-mergekit/bin``; ``--skip-mergekit`` times skillgraft and the floor only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DENSITY = 0.5
EXPERT_SCALE = 0.8


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given
    for cand in (Path(sys.executable).parent / "mergekit-yaml", shutil.which("mergekit-yaml"),
                 ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, int, str]:
    """Run ``cmd``; return (wall seconds, CPU seconds, peak RSS in GB, exit status, stderr tail).

    CPU seconds (user + system, all threads) are reported next to wall time because they are far
    less sensitive to other load on a shared machine.
    """
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # read stderr in the background so the child never blocks on a full pipe
    import threading

    err: list[bytes] = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    tail = (err[0] if err else b"").decode(errors="replace")[-2000:]
    return wall, cpu, usage.ru_maxrss / 1024 / 1024, p.returncode, tail


def warm(dirs: list[Path]) -> None:
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass


def mergekit_config(method: str, d: Path) -> dict:
    mk_name = {"ta": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties", "dare": "dare_linear"}[method]
    vlm_p: dict = {"weight": 1.0}
    exp_p: dict = {"weight": EXPERT_SCALE}
    if method != "ta":
        vlm_p["density"] = DENSITY
        exp_p["density"] = DENSITY
    cfg = {
        "merge_method": mk_name,
        "base_model": str(d / "base"),
        "models": [{"model": str(d / "vlm"), "parameters": vlm_p}, {"model": str(d / "expert"), "parameters": exp_p}],
        "dtype": "bfloat16",
    }
    if method == "ties":
        cfg["parameters"] = {"normalize": True}
    return cfg


def skillgraft_recipe(method: str, d: Path, mode: str) -> dict:
    dens = 1.0 if method == "ta" else DENSITY
    params: dict = {}
    if method == "ties":
        params["normalize"] = True
    # DARE: each tool's default rescale (ours 1/density as the paper, mergekit's L1-norm match);
    # ``rescale: l1`` would reproduce mergekit's but needs whole tensors (no row blocks).
    return {
        "vlm": str(d / "vlm"),
        "base": str(d / "base"),
        "experts": [{"model": str(d / "expert"), "scale": EXPERT_SCALE, "density": dens}],
        "method": method,
        "mode": mode,
        "vlm_weight": 1.0,
        "vlm_density": dens if mode == "symmetric" else 1.0,
        "parameters": params,
        "seed": 0,
        "dtype": "bfloat16",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="directory with base/, vlm/, expert/ (bench/make_synthetic.py)")
    ap.add_argument("--methods", default="ta,ties,dare_ties")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="symmetric", choices=["symmetric", "inject"],
                    help="skillgraft mode (symmetric = mergekit's semantics)")
    ap.add_argument("--mergekit", help="path to mergekit-yaml")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    d: Path = args.dir
    inputs = [d / "vlm", d / "base", d / "expert"]
    for p in inputs:
        if not (p / "config.json").is_file():
            ap.error(f"{p} is not a checkpoint; run bench/make_synthetic.py {d} first")
    work = d / "_bench"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    mk = None if args.skip_mergekit else find_mergekit(args.mergekit)
    if not args.skip_mergekit and mk is None:
        ap.error("mergekit-yaml not found: pip install mergekit==0.1.5, or pass --mergekit or --skip-mergekit")

    rows: list[dict] = []

    def record(method: str, tool: str, cmd: list[str], out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)
        if out.suffix:
            out.unlink(missing_ok=True)
        warm(inputs)
        load = os.getloadavg()[0]
        wall, cpu, rss, rc, err = measure(cmd, env)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        if rc != 0:
            print(f"{tool} {method} failed (exit {rc}):\n{err}", file=sys.stderr)
        rows.append({"method": method, "tool": tool, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "peak_rss_gb": round(rss, 2), "load_before": round(load, 2), "ok": rc == 0})
        print(f"  {method:10s} {tool:22s} {wall:8.1f} s wall {cpu:8.1f} s cpu {rss:6.2f} GB  (load {load:.1f})"
              + ("" if rc == 0 else "  FAILED"), flush=True)

    if not args.skip_floor:
        out = work / "floor.safetensors"
        record("floor", "read+write", [sys.executable, str(ROOT / "bench" / "floor.py"), str(out), *map(str, inputs)], out)

    for method in args.methods.split(","):
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(skillgraft_recipe(method, d, args.mode)))
        label = "skillgraft" + (f" ({args.device})" if args.device != "cpu" else "")
        record(method, label, [sys.executable, "-m", "skillgraft", "inject", "--recipe", str(recipe), "-o",
                               str(work / f"sg_{method}"), "--device", args.device, "--force", "-q"], work / f"sg_{method}")
        if mk:
            cfg = work / f"{method}_mergekit.yaml"
            cfg.write_text(yaml.safe_dump(mergekit_config(method, d)))
            mk_cmd = [mk, str(cfg), str(work / f"mk_{method}"), "--no-copy-tokenizer", "--random-seed", "0", "--quiet",
                      "--no-write-model-card"]
            if args.device != "cpu":
                mk_cmd += ["--cuda"]
            record(method, "mergekit" + (" (cuda)" if args.device != "cpu" else ""), mk_cmd, work / f"mk_{method}")

    # table
    by = {(r["method"], r["tool"].split(" ")[0]): r for r in rows}
    floor = by.get(("floor", "read+write"))
    print()
    print("| method | skillgraft wall s (cpu s) | mergekit wall s (cpu s) | wall ratio | cpu ratio "
          "| skillgraft peak RSS GB | mergekit peak RSS GB |")
    print("|---|---|---|---|---|---|---|")

    def cell(r):
        return f"{r['wall_s']} ({r['cpu_s']})" if r else "-"

    for method in args.methods.split(","):
        sg, mkr = by.get((method, "skillgraft")), by.get((method, "mergekit"))
        ratio = f"{sg['wall_s'] / mkr['wall_s']:.2f}x" if sg and mkr else "-"
        cratio = f"{sg['cpu_s'] / mkr['cpu_s']:.2f}x" if sg and mkr else "-"
        print(f"| {method} | {cell(sg)} | {cell(mkr)} | {ratio} | {cratio} | "
              f"{sg['peak_rss_gb'] if sg else '-'} | {mkr['peak_rss_gb'] if mkr else '-'} |")
    if floor:
        print(f"| floor (read inputs once + write output) | {cell(floor)} | | | | {floor['peak_rss_gb']} | |")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "mode": args.mode, "rows": rows}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

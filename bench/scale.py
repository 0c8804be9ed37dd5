"""The cost curve: wall time, CPU time and peak memory of merges against model size, and the I/O floor.

For each size a synthetic triple is built once (``bench/make_synthetic.py``) under WORK/SIZE, then
each run is a child process measured with ``os.wait4`` (wall seconds, user + system CPU seconds,
peak RSS):

- ``floor``: ``bench/floor.py``, read every input once and write one output of the same size, with
  buffered I/O (``read``/``write`` through the page cache) and with direct I/O (``--direct``);
- ``skillgraft``: ``skillgraft inject`` with default settings, in mergekit's semantics (``mode:
  symmetric``, the VLM's language model as one more task vector; expert weight 0.8, density 0.5 for
  TIES and DARE-TIES, TIES ``normalize: true``);
- ``mergekit``: mergekit 0.1.5's ``mergekit-yaml`` on the same triple (``base_model: base``, models
  ``vlm`` weight 1 and ``expert`` weight 0.8);
- at 72B widths the VLM is a Qwen2-VL checkpoint, which mergekit cannot read: mergekit merges its
  language model alone (``vlm-llm/``), and skillgraft runs both that LLM-only merge (for the ratio)
  and the real VLM merge (``skillgraft (VLM)``, inject mode, the default);
- ``--library`` adds the same merges through the Python API (``skillgraft.api.inject``) as a library
  caller makes them: the process's allocator and torch thread count left as they are, one merge
  worker (the command line sets its own allocator policy and one intra-op thread per worker).

Inputs that fit in half the memory are read once before each run (warm page cache); larger ones are
dropped from the page cache before each run (``posix_fadvise(DONTNEED)``), so every tool starts
from disk alike. The machine is shared: ``--repeat`` repeats each run and reports every figure.

    python bench/scale.py /tmp/sg-scale --sizes 0.25b,1b,72b --json scale.json --plot docs/scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERT_SCALE = 0.8
DENSITY = 0.5

SIZES: dict[str, list[str]] = {
    "0.25b": ["--hidden", "1024", "--intermediate", "2816", "--layers", "20", "--heads", "16", "--kv-heads", "4"],
    "1b": [],
    "72b": ["--arch", "qwen2", "--qwen2-vl", "--hidden", "8192", "--intermediate", "29568", "--layers", "1",
            "--heads", "64", "--kv-heads", "8", "--vocab", "152064"],
}
MK_NAMES = {"ta": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties", "dare": "dare_linear"}


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + system, all threads), peak RSS, exit status."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err: list[bytes] = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    t.join()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        print((err[0] if err else b"").decode(errors="replace")[-3000:], file=sys.stderr)
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "ok": rc == 0}


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def cache(dirs: list[Path], warm: bool) -> None:
    """Read every weight file once (warm), or drop them from the page cache (cold)."""
    for d in dirs:
        for f in weight_files(d):
            with open(f, "rb") as fh:
                if warm:
                    while fh.read(1 << 26):
                        pass
                else:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def nbytes(dirs: list[Path]) -> int:
    return sum(f.stat().st_size for d in dirs for f in weight_files(d))


def mergekit_config(method: str, base: Path, vlm: Path, expert: Path) -> dict:
    vlm_p: dict = {"weight": 1.0}
    exp_p: dict = {"weight": EXPERT_SCALE}
    if method != "ta":
        vlm_p["density"] = exp_p["density"] = DENSITY
    cfg = {"merge_method": MK_NAMES[method], "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(vlm), "parameters": vlm_p}, {"model": str(expert), "parameters": exp_p}]}
    if method == "ties":
        cfg["parameters"] = {"normalize": True}
    return cfg


def skillgraft_recipe(method: str, base: Path, vlm: Path, expert: Path, mode: str) -> dict:
    dens = 1.0 if method == "ta" else DENSITY
    return {"vlm": str(vlm), "base": str(base), "method": method, "mode": mode, "seed": 0,
            "experts": [{"model": str(expert), "scale": EXPERT_SCALE, "density": dens}],
            "vlm_density": dens if mode == "symmetric" else 1.0,
            "parameters": {"normalize": True} if method == "ties" else {}}


def find_mergekit(given: str | None) -> str | None:
    for cand in (given, Path(sys.executable).parent / "mergekit-yaml", shutil.which("mergekit-yaml")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def params_of(d: Path) -> float:
    return sum(f.stat().st_size for f in weight_files(d)) / 2 / 1e9


def run_size(size: str, work: Path, args: argparse.Namespace, env: dict[str, str], mk: str | None) -> list[dict]:
    d = work / size
    if not (d / "expert" / "config.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_synthetic.py"), str(d), *SIZES[size]], check=True,
                       env=env)
        print(f"built {d} in {time.perf_counter() - t:.0f} s", flush=True)
    vlm_llm = d / "vlm-llm" if (d / "vlm-llm").is_dir() else d / "vlm"
    has_vl = vlm_llm != d / "vlm"
    llm = [vlm_llm, d / "base", d / "expert"]
    warm = nbytes(llm) < 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = work / "_out"
    rows: list[dict] = []

    def record(tool: str, method: str, cmd: list[str], inputs: list[Path]) -> None:
        for rep in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            out.unlink(missing_ok=True) if out.is_file() else None
            cache(inputs, warm)
            load = os.getloadavg()[0]
            r = measure(cmd, env)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            r.update(size=size, params_b=round(params_of(vlm_llm), 3), tool=tool, method=method, repeat=rep,
                     load=round(load, 2), cache="warm" if warm else "cold")
            rows.append(r)
            print(f"{size:6} {tool:18} {method:10} {r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s cpu "
                  f"{r['peak_rss_gib']:6.2f} GiB  (load {load:.1f}, {r['cache']})" + ("" if r["ok"] else "  FAILED"),
                  flush=True)

    def floor(inputs: list[Path], target: str) -> None:
        for mode, flag in (("buffered", []), ("direct", ["--direct"])):
            record(f"floor ({target})", mode, [sys.executable, str(ROOT / "bench" / "floor.py"), *flag, str(out),
                                               *map(str, inputs)], inputs)

    def skillgraft(tool: str, method: str, vlm: Path, mode: str) -> None:
        recipe = work / f"{size}-{method}.yaml"
        recipe.write_text(yaml.safe_dump(skillgraft_recipe(method, d / "base", vlm, d / "expert", mode)))
        record(tool, method, [sys.executable, "-m", "skillgraft", "inject", "--recipe", str(recipe), "-o", str(out),
                              "--force", "-q"], [vlm, d / "base", d / "expert"])
        if args.library:
            code = ("import sys; from skillgraft.api import inject; from skillgraft.recipe import Recipe; "
                    "inject(Recipe.load(sys.argv[1]), sys.argv[2], force=True, progress=False)")
            record(tool.replace("skillgraft", "library"), method, [sys.executable, "-c", code, str(recipe), str(out)],
                   [vlm, d / "base", d / "expert"])

    floor(llm, "LLM")
    for method in args.methods.split(","):
        skillgraft("skillgraft", method, vlm_llm, "symmetric")
        if mk and method in args.mergekit_methods.get(size, args.methods).split(","):
            cfg = work / f"{size}-{method}-mergekit.yaml"
            cfg.write_text(yaml.safe_dump(mergekit_config(method, d / "base", vlm_llm, d / "expert")))
            record("mergekit", method, [mk, str(cfg), str(out), "--no-copy-tokenizer", "--random-seed", "0", "--quiet",
                                        "--no-write-model-card"], llm)
    if has_vl:
        floor([d / "vlm", d / "base", d / "expert"], "VLM")
        for method in args.methods.split(","):
            skillgraft("skillgraft (VLM)", method, d / "vlm", "inject")
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per size and method, each tool's wall s (CPU s) and peak RSS; ratios to mergekit and to
    the floors (buffered / direct I/O) of the same inputs (best wall times of the repeats)."""
    def cell(rs: list[dict]) -> str:
        return " / ".join(f"{r['wall_s']:.1f} ({r['cpu_s']:.1f})" for r in rs) if rs else "-"

    def mem(rs: list[dict]) -> str:
        return " / ".join(f"{r['peak_rss_gib']:.2f}" for r in rs) if rs else "-"

    def best(rs: list[dict]) -> float:
        return min(r["wall_s"] for r in rs)

    lines = ["| size | merge | skillgraft wall s (CPU s) | peak RSS GiB | mergekit wall s (CPU s) | peak RSS GiB "
             "| vs mergekit | vs floor (buffered / direct) |", "|---|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        of = [r for r in rows if r["size"] == size and r["ok"]]
        for tool, target in (("skillgraft", "LLM"), ("library", "LLM"), ("skillgraft (VLM)", "VLM"),
                             ("library (VLM)", "VLM")):
            fl = {m: [r for r in of if r["tool"] == f"floor ({target})" and r["method"] == m] for m in ("buffered", "direct")}
            for method in dict.fromkeys(r["method"] for r in of if r["tool"] == tool):
                sg = [r for r in of if r["tool"] == tool and r["method"] == method]
                mk = [r for r in of if r["tool"] == "mergekit" and r["method"] == method] if target == "LLM" else []
                ratio = f"{best(sg) / best(mk):.2f}x" if mk else "-"
                fratio = " / ".join(f"{best(sg) / best(f):.2f}x" for f in fl.values() if f) or "-"
                label = f"{method} ({'VLM, inject' if target == 'VLM' else 'LLM, symmetric'})"
                if tool.startswith("library"):
                    label += ", Python API"
                lines.append(f"| {size} | {label} | {cell(sg)} | {mem(sg)} | {cell(mk)} | {mem(mk)} | {ratio} | {fratio} |")
            for m, f in fl.items() if not tool.startswith("library") else ():
                if f:
                    lines.append(f"| {size} | I/O floor, {target} inputs, {m} | {cell(f)} | {mem(f)} | | | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Wall time and peak RSS against checkpoint size: a colour per method, a line style per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple[str, str], dict[float, tuple[float, float]]] = {}
    for r in rows:
        if r["ok"] and r["tool"] in ("skillgraft", "mergekit", "floor (LLM)"):
            tool = "floor" if r["tool"].startswith("floor") else r["tool"]
            by = series.setdefault((tool, r["method"]), {})
            w, m = by.get(r["params_b"], (r["wall_s"], r["peak_rss_gib"]))
            by[r["params_b"]] = (min(w, r["wall_s"]), max(m, r["peak_rss_gib"]))
    colours = {"ta": "tab:blue", "ties": "tab:red", "dare_ties": "tab:green", "dare": "tab:purple",
               "buffered": "tab:gray", "direct": "black"}
    styles = {"skillgraft": "-", "mergekit": "--", "floor": ":"}
    for (tool, method), by in sorted(series.items()):
        xs = sorted(by)
        label = f"I/O floor ({method})" if tool == "floor" else f"{tool} {method}"
        kw = dict(ls=styles[tool], marker="o", color=colours.get(method), label=label)
        ax_t.plot(xs, [by[x][0] for x in xs], **kw)
        if tool != "floor":
            ax_m.plot(xs, [by[x][1] for x in xs], **kw)
    sizes = {r["params_b"]: r["size"] for r in rows}
    for ax, ylab in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(sizes), [f"{sizes[x]}\n({x:.2f}B)" for x in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("synthetic triple (parameters per checkpoint)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="major")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="where the synthetic triples are built (kept for later runs)")
    ap.add_argument("--sizes", default="0.25b,1b,72b", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--methods", default="ta,ties,dare_ties")
    ap.add_argument("--mergekit-72b", default="ta", help="mergekit methods at 72B widths (it takes ~15 GB there)")
    ap.add_argument("--mergekit", help="path to mergekit-yaml (default: next to this Python, or on PATH)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--library", action="store_true", help="also run each skillgraft merge through the Python API")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--from-json", type=Path, help="print the table and draw the plot of a previous --json; run nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    args.mergekit_methods = {"72b": args.mergekit_72b}
    mk = None if args.skip_mergekit else find_mergekit(args.mergekit)
    if not args.skip_mergekit and mk is None:
        ap.error("mergekit-yaml not found: pip install mergekit==0.1.5, or pass --mergekit or --skip-mergekit")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for size in args.sizes.split(","):
        rows += run_size(size, args.work, args, env, mk)
        if args.json:
            args.json.write_text(json.dumps({"rows": rows}, indent=1))
    print()
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

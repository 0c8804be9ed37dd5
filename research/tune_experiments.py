"""docs/tuning.md: the label-free ``tune`` against the labelled 16-point sweep on the micro-world.

    python research/tune_experiments.py --work tune-work --out docs
    python research/tune_experiments.py --work tune-work --out docs --synthetic /tmp/sg-synth   # + inspect speed

For each micro-world expert and each of ta, dare (density 0.5) and ties (density 0.5):

1. the labelled sweep, exactly as a user runs it: ``skillgraft sweep VLM EXPERT --base BASE --method M
   --vary scale=0:1.5:0.1 --eval microworld`` (all 256 items of every scenario), timed;
2. probes: ``skillgraft zoo probes EXPERT -n 256`` (disjoint from the benchmark's items);
3. ``skillgraft tune`` with its defaults, global and ``--per-layer``, timed; each output checkpoint is
   then scored with ``skillgraft eval`` (the benchmark is used only here, to grade the pick);
4. ``skillgraft inspect`` on the pair, and ``skillgraft inject`` at scale 1, timed.

Then, for TA, the label-free signals at every grid scale next to the labelled numbers (which
retention signal tracks ``general``), retention measured on 2048 fresh ``general`` items (what the
256-item benchmark estimates), and the inspect statistics next to the zones. Every command is run
as a subprocess and timed by wall clock and by CPU time (user + system of the child), since this
machine is shared (each on one thread, ``OMP_NUM_THREADS=1``). Results are cached as JSON in
``--work``; delete a file there to recompute it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from skillgraft.microworld.scenarios import EXPERT_SCENARIO
from skillgraft.tune.objective import DEFAULT_CONFIDENCE, z_of

EXPERTS = tuple(EXPERT_SCENARIO)
METHODS: dict[str, list[str]] = {"ta": [], "dare": ["--density", "0.5"], "ties": ["--density", "0.5"]}  # tune/inject flags
SWEEP_FLAGS: dict[str, list[str]] = {"ta": [], "dare": ["--vary", "density=0.5"], "ties": ["--vary", "density=0.5"]}
GRID = [round(0.1 * k, 1) for k in range(16)]
N_PROBES = 256
N_FRESH = 2048
N_DRAWS = 4  # disjoint draws of N_PROBES image and text probes each, to see how a rule's pick varies with its probes
DRAW_LEVELS = (0.5, 0.8413)  # --confidence levels compared over the draws: the estimate itself, one standard error
MIN_RET = 0.95
Z = z_of(DEFAULT_CONFIDENCE)  # tune's default: the estimate less Z standard errors must clear MIN_RET
ALT = 0.5 if DEFAULT_CONFIDENCE != 0.5 else 0.8413  # the other --confidence level, run beside the default
# every timed command runs on one thread: on a shared machine, idle OpenMP threads spinning on a busy
# core inflate CPU time unevenly between commands
THREADS = "1"


def zoo(name: str) -> str:
    from skillgraft.microworld.zoo import zoo_path

    return str(zoo_path(name))


def sg(*args: str, threads: str | None = THREADS) -> dict[str, Any]:
    """Run ``skillgraft ARGS`` in a child process (``threads``: its OMP_NUM_THREADS; None: the
    machine's default): its wall and CPU seconds and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run([sys.executable, "-m", "skillgraft", *args], capture_output=True, text=True, check=False,
                       env={**env, "OMP_NUM_THREADS": threads} if threads else env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"skillgraft {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": p.stdout}


def startup() -> dict[str, float]:
    """What every command pays before its work: Python, skillgraft's API, torch, transformers and the
    model classes both commands load (best of three)."""
    code = "import skillgraft.api, transformers; transformers.LlavaForConditionalGeneration; transformers.LlamaForCausalLM"
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": THREADS})
        walls.append(time.perf_counter() - t)
    return {"wall_s": min(walls)}


def cached(path: Path, fn) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    data = fn()
    path.write_text(json.dumps(data, indent=1))
    return data


# ----------------------------------------------------------------------------- runs


def applied(vlm: Any, expert: str, scales: list[float], method: str = "ta"):
    """Yield each scale with ``expert`` merged into the loaded ``vlm`` in place (restored after each)."""
    import dataclasses

    from skillgraft.pipeline import prepare
    from skillgraft.recipe import Recipe
    from skillgraft.sweep.inplace import InPlaceModel

    density = 0.5 if METHODS[method] else 1.0
    recipe = Recipe(vlm=zoo("vlm"), base=zoo("base"), method=method,
                    experts=[{"model": zoo(expert), "density": density}])
    with ExitStack() as stack:
        prep = prepare(recipe, stack)
        ip = InPlaceModel(vlm, prep.plan, cache_taus=True)
        for s in scales:
            ip.apply(dataclasses.replace(prep.settings, scales=[s]))
            try:
                yield s, ip
            finally:
                ip.restore()


def labelled_sweep(work: Path, expert: str, method: str) -> dict[str, Any]:
    from skillgraft.sweep.store import Store

    d = work / f"sweep-{expert}-{method}"
    if d.exists():
        import shutil

        shutil.rmtree(d)  # a fresh sweep, so its time is a whole sweep's
    run = sg("sweep", zoo("vlm"), zoo(expert), "--base", zoo("base"), "--method", method, *SWEEP_FLAGS[method],
             "--vary", "scale=0:1.5:0.1", "--eval", "microworld", "-o", str(d), "-q", "--no-report")
    with Store(d, create=False) as st:
        base = st.baseline().scores
        work_s = st.baseline().timings.get("total_s", 0.0) + sum(t.timings.get("total_s", 0.0) for t in st.trials())
        points = {f"{float(t.params['scale']):.1f}": t.scores for t in st.trials()}
    target = EXPERT_SCENARIO[expert]
    feasible = {s: p for s, p in points.items() if p["general"] >= MIN_RET * base["general"]}
    best = max(feasible, key=lambda s: (feasible[s][target], -float(s)))
    return {"baseline": base, "points": points, "best_scale": float(best), "best": points[best],
            "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "work_s": work_s}


def probes(work: Path, expert: str) -> Path:
    d = work / f"probes-{expert}"
    if not (d / "text_prompts.jsonl").is_file():
        sg("zoo", "probes", expert, "-o", str(d), "-n", str(N_PROBES))
    return d


def probe_draws(work: Path, expert: str) -> list[tuple[Path, Path]]:
    """N_DRAWS disjoint sets of N_PROBES image and text probes (from one draw of N_DRAWS * N_PROBES)."""
    d = work / f"probes-{expert}-x{N_DRAWS}"
    if not (d / "text_prompts.jsonl").is_file():
        sg("zoo", "probes", expert, "-o", str(d), "-n", str(N_DRAWS * N_PROBES))
    out = []
    for name in ("image_prompts", "text_prompts"):
        lines = (d / f"{name}.jsonl").read_text().splitlines()
        for k in range(N_DRAWS):  # beside the images: their paths are relative to the file
            (d / f"{name}.d{k}.jsonl").write_text("\n".join(lines[k * N_PROBES:(k + 1) * N_PROBES]) + "\n")
    return [(d / f"image_prompts.d{k}.jsonl", d / f"text_prompts.d{k}.jsonl") for k in range(N_DRAWS)]


def tuned(work: Path, expert: str, method: str, per_layer: bool, extra: tuple[str, ...] = (),
          label: str = "", files: tuple[Path, Path] | None = None) -> dict[str, Any]:
    p = probes(work, expert)
    image_file, text_file = files or (p / "image_prompts.jsonl", p / "text_prompts.jsonl")
    out = work / f"tune-{expert}-{method}{'-per-layer' if per_layer else ''}{label}"
    run = sg("tune", zoo("vlm"), zoo(expert), "--base", zoo("base"), "--method", method, *METHODS[method],
             "--image-prompts", str(image_file), "--text-prompts", str(text_file),
             "-o", str(out), "--force", "-q", *(["--per-layer"] if per_layer else []), *extra)
    record = json.loads((out / "skillgraft_tune.json").read_text())
    scores = work / f"{out.name}.scores.json"
    sg("eval", str(out), "--json", str(scores), "-q")
    return {"scale": record["chosen"]["scale"], "scales": record["chosen"]["scales"],
            "retention_estimate": record["chosen"]["retention"], "uptake": record["chosen"]["uptake"],
            "retention_se": record["chosen"].get("retention_se"),
            "candidates": len(record["candidates"]), "scores": json.loads(scores.read_text()),
            "out": out.name, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "seconds": record["seconds"]}


def inspected(work: Path, expert: str) -> dict[str, Any]:
    j = work / f"inspect-{expert}.json"
    runs = []
    for _ in range(2):  # interleaved, best of two each: this machine is shared
        a = sg("inspect", zoo("vlm"), zoo(expert), "--base", zoo("base"), "--json", str(j), "-q")
        b = sg("inject", zoo("vlm"), zoo(expert), "--base", zoo("base"), "--scale", "1", "-o",
               str(work / "inject-tmp"), "--force", "-q")
        runs.append((a, b))
    data = json.loads(j.read_text())
    return {"overall": data["overall"], "per_layer": [{k: r[k] for k in ("layer", "ratio", "cosine", "sign_conflict")}
                                                      for r in data["per_layer"]],
            "per_kind": {r["kind"]: r["ratio"] for r in data["per_kind"]},
            "inspect_wall_s": min(a["wall_s"] for a, _ in runs), "inject_wall_s": min(b["wall_s"] for _, b in runs),
            "inspect_cpu_s": min(a["cpu_s"] for a, _ in runs), "inject_cpu_s": min(b["cpu_s"] for _, b in runs)}


def synthetic_speed(root: Path, work: Path) -> dict[str, Any]:
    """inspect vs a TA inject on a synthetic ~1B-parameter triple (bench/make_synthetic.py), each with
    the machine's default threads (both then measure or merge one row block per core)."""
    if not (root / "expert" / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "make_synthetic.py"),
                        str(root)], check=True)
    runs = []
    for _ in range(2):
        a = sg("inspect", str(root / "vlm"), str(root / "expert"), "--base", str(root / "base"), "--json",
               str(work / "inspect-synthetic.json"), "-q", threads=None)
        b = sg("inject", str(root / "vlm"), str(root / "expert"), "--base", str(root / "base"), "--method", "ta",
               "-o", str(work / "inject-synthetic"), "--force", "-q", threads=None)
        runs.append((a, b))
    import shutil

    shutil.rmtree(work / "inject-synthetic", ignore_errors=True)
    return {"inspect_wall_s": [a["wall_s"] for a, _ in runs], "inject_wall_s": [b["wall_s"] for _, b in runs],
            "inspect_cpu_s": [a["cpu_s"] for a, _ in runs], "inject_cpu_s": [b["cpu_s"] for _, b in runs]}


def signals(work: Path, expert: str) -> dict[str, Any]:
    """Label-free signals of TA at every grid scale, on the same probes ``tune`` uses, plus the VLM's
    own variation under its attention dropout (the calibration the obvious alternative would use)."""
    import torch

    from skillgraft.evaluate import load_model
    from skillgraft.tune.objective import Reference
    from skillgraft.tune.prompts import read_image_prompts, read_text_prompts
    from skillgraft.tune.signals import score, teacher_answers

    p = probes(work, expert)
    ex, _ = load_model(zoo(expert))
    vlm, proc = load_model(zoo("vlm"))
    text = teacher_answers(ex, proc, read_text_prompts(p / "text_prompts.jsonl"), batch_size=64)
    ex_text = score(ex, text)
    del ex
    image = teacher_answers(vlm, proc, read_image_prompts(p / "image_prompts.jsonl"), batch_size=64)
    v_img, v_txt = score(vlm, image), score(vlm, text)
    ref = Reference.from_scores(v_img, v_txt, ex_text)
    vlm.train()  # the VLM's attention dropout on: its own variation
    torch.manual_seed(0)
    drop = [score(vlm, image) for _ in range(5)]
    vlm.eval()
    out: dict[str, Any] = {"vlm_nll": v_img.mean_nll, "dropout_kept": sum(d.kept_rate for d in drop) / 5,
                           "dropout_nll": sum(d.mean_nll for d in drop) / 5, "rows": {}}
    for s, _ in applied(vlm, expert, GRID):
        i, t = score(vlm, image), score(vlm, text)
        out["rows"][f"{s:.1f}"] = {"weighted_kept": ref.retention(i), "weighted_se": ref.retention_se(i), "kept": i.kept_rate,
                                   "nll_ratio": i.mean_nll / v_img.mean_nll, "uptake": ref.uptake(t)}
    return out


def fresh_items() -> list[Any]:
    """N_FRESH new English image questions, none of them a benchmark (or probe) item."""
    from skillgraft.microworld import world as W
    from skillgraft.microworld.probes import benchmark_keys, image_probe_items, item_key

    banned = benchmark_keys() | {item_key(it) for it in image_probe_items(N_PROBES)}
    rng = random.Random(424242)
    items: list[Any] = []
    while len(items) < N_FRESH:
        it = W.make_item(rng, "en")
        if item_key(it) not in banned:
            items.append(it)
    return items


def fresh_accuracy(model: Any, proc: Any) -> float:
    from skillgraft.evaluate.microworld import predict

    items = fresh_items()
    preds = predict(model, proc, items, batch_size=256)
    return sum(a == it.answer for a, it in zip(preds, items)) / len(items)


def fresh_retention_of(checkpoint: Path) -> float:
    """``general`` retention of a checkpoint on the fresh items (relative to the VLM's)."""
    from skillgraft.evaluate.microworld import load

    return fresh_accuracy(*load(str(checkpoint))) / fresh_accuracy(*load(zoo("vlm")))


def fresh_retention(work: Path, expert: str) -> dict[str, float]:
    """``general`` retention of TA on the fresh items at every grid scale."""
    from skillgraft.evaluate.microworld import load

    vlm, proc = load(zoo("vlm"))
    a0 = fresh_accuracy(vlm, proc)
    return {f"{s:.1f}": fresh_accuracy(vlm, proc) / a0 for s, _ in applied(vlm, expert, GRID)}


def method_delta_norm(expert: str, method: str) -> float:
    """|M(tau_E)| at scale 1 over the merged tensors: what the method actually adds to the VLM."""
    from skillgraft.evaluate import load_model

    vlm, _ = load_model(zoo("vlm"))
    sq = 0.0
    for _, ip in applied(vlm, expert, [1.0], method):
        sq = sum(float((s.param.float() - s.original.float()).square().sum()) for s in ip.slots)
    return math.sqrt(sq)


# ----------------------------------------------------------------------------- analysis


def gain(r: dict[str, Any], scores: dict[str, float], expert: str) -> float:
    t = EXPERT_SCENARIO[expert]
    return scores[t] - r["baseline"][t]


def retention(r: dict[str, Any], scores: dict[str, float]) -> float:
    return scores["general"] / r["baseline"]["general"]


def verdict(ret: float, frac: float | None, time_ratio: float, work_ratio: float) -> str:
    miss = []
    if ret < MIN_RET:
        miss.append(f"retention {100 * (MIN_RET - ret):.1f} pt below 95%")
    if frac is not None and frac < 0.9:
        miss.append(f"gain {100 * frac:.0f}% of best (< 90%)")
    if time_ratio > 0.25:
        miss.append(f"command time {time_ratio:.2f} > 0.25" + (" (work within it)" if work_ratio <= 0.25 else ""))
    elif work_ratio > 0.25:
        miss.append(f"work time {work_ratio:.2f} > 0.25")
    return "met" if not miss else "; ".join(miss)


def rule_pick(sig: dict[str, Any], holds) -> float:
    """The largest-uptake grid scale where a retention rule holds (uptake rises with scale here)."""
    ok = [s for s in sig["rows"] if holds(sig["rows"][s])]
    return float(max(ok, key=lambda s: (sig["rows"][s]["uptake"], -float(s))))


def spearman(xs: list[float], ys: list[float]) -> float | None:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


def plot_expert(path: Path, expert: str, lab: dict[str, Any], sig: dict[str, Any], fresh: dict[str, float],
                pick: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = GRID
    t = EXPERT_SCENARIO[expert]
    fig, ax = plt.subplots(figsize=(7.6, 3.3), dpi=100)
    ax.plot(xs, [retention(lab, lab["points"][f"{s:.1f}"]) for s in xs], "o-", ms=3, label="general retention (benchmark)")
    ax.plot(xs, [fresh[f"{s:.1f}"] for s in xs], "-", lw=1, color="grey", label=f"general retention ({N_FRESH} fresh items)")
    ax.plot(xs, [sig["rows"][f"{s:.1f}"]["weighted_kept"] for s in xs], "s--", ms=3, label="tune's estimate (no labels)")
    ax.plot(xs, [lab["points"][f"{s:.1f}"][t] for s in xs], "^-", ms=3, label=f"{t} (target)")
    ax.plot(xs, [sig["rows"][f"{s:.1f}"]["uptake"] for s in xs], ":", label="tune's uptake (no labels)")
    ax.axhline(MIN_RET, color="black", lw=0.6, ls=":")
    ax.axvline(lab["best_scale"], color="green", lw=0.8, label="labelled best feasible")
    ax.axvline(pick, color="red", lw=0.8, ls="--", label="tune's pick")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("TA scale")
    ax.set_title(f"{expert}: labelled vs label-free", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def f3(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def summary(R: dict[str, Any]) -> list[str]:
    """The findings in a few sentences, each computed from the runs."""
    L, T, TP = R["labelled"], R["tune"], R["tune_pl"]
    out = ["## Summary", ""]
    for e in EXPERTS:
        lab, t = L[f"{e}/ta"], T[f"{e}/ta"]
        gb, g, ret = gain(lab, lab["best"], e), gain(lab, t["scores"], e), retention(lab, t["scores"])
        v = verdict(ret, g / gb if gb > 0 else None, t["wall_s"] / lab["wall_s"], t["seconds"]["total_s"] / lab["work_s"])
        why = ""
        if ret < MIN_RET:
            fr, est = t["fresh_retention"], t["retention_estimate"]
            why = (f" Why: the benchmark's sampling noise; on {N_FRESH} fresh items the pick keeps {fr:.3f}." if fr >= MIN_RET
                   else f" Why: tune's estimate ({est:.3f}, {N_PROBES} probes) was {100 * (est - fr):.1f} pt above the "
                        f"fresh-item retention ({fr:.3f}), and the benchmark's 256 items put it {100 * (fr - ret):.1f} pt "
                        "lower still; a pick on the boundary lands on either side of it by that much.")
        if g < 0.9 * gb:
            bs = f"{lab['best_scale']:.1f}"
            row = R["signals"][e]["rows"][bs]
            why += (f" Why (gain): the rule holds the estimate less {Z:.2f} standard errors ({t['retention_se']:.3f} at the "
                    f"pick) to 0.95; at the labelled best scale {lab['best_scale']:.1f} the estimate is "
                    f"{row['weighted_kept']:.3f} ({row['weighted_se']:.3f}) while fresh items keep "
                    f"{R['fresh'][e][bs]:.3f}: the zone's edge is out of the rule's reach.")
        out.append(f"- **{e}** (TA): tune picks {t['scale']:.3f} where the labelled sweep picks {lab['best_scale']:.1f}: "
                   f"{100 * g:+.1f} points on {EXPERT_SCENARIO[e]} ({100 * g / gb:.0f}% of the labelled best "
                   f"{100 * gb:+.1f}), `general` retention {ret:.3f} on the benchmark and {t['fresh_retention']:.3f} on "
                   f"fresh items. Goal: {v}.{why}")
    ratios = [T[f"{e}/ta"]["wall_s"] / L[f"{e}/ta"]["wall_s"] for e in EXPERTS]
    works = [T[f"{e}/ta"]["seconds"]["total_s"] / L[f"{e}/ta"]["work_s"] for e in EXPERTS]
    st = R["startup"]["wall_s"]
    net = [(T[f"{e}/ta"]["wall_s"] - st) / (L[f"{e}/ta"]["wall_s"] - st) for e in EXPERTS]
    out.append(f"- Time: tune takes {min(ratios):.2f}-{max(ratios):.2f} of the labelled sweep's command time, "
               f"{min(works):.2f}-{max(works):.2f} of the time each command records for its own work, and "
               f"{min(net):.2f}-{max(net):.2f} once the {st:.1f} s both commands spend starting up (Python, torch, "
               f"transformers, the model classes) is taken off. That start-up alone is "
               f"{100 * st / max(T[e + '/ta']['wall_s'] for e in EXPERTS):.0f}-{100 * st / min(T[e + '/ta']['wall_s'] for e in EXPERTS):.0f}% "
               "of tune's command time on a model this small; a sweep's cost grows with its benchmark and its grid, "
               "tune's with the number of probes and candidates.")
    n = N_DRAWS * len(EXPERTS)
    viol = {lv: sum(r < MIN_RET for e in EXPERTS for r in draw_stats(R, e, lv)["fresh"]) for lv in DRAW_LEVELS}
    short = {lv: sum(f < 0.9 for e in EXPERTS for f in draw_stats(R, e, lv)["fracs"]) for lv in DRAW_LEVELS}
    met = {lv: sum(draw_stats(R, e, lv)["met_fresh"] for e in EXPERTS) for lv in DRAW_LEVELS}
    ses = [x for e in EXPERTS for lv in DRAW_LEVELS for x in draw_stats(R, e, lv)["se"]]
    out.append(f"- The retention rule, on {n} draws of probes (3 experts x {N_DRAWS}, TA): holding the estimate itself "
               f"to 0.95 (`--confidence 0.5`) keeps less than 95% of `general` on fresh items in {viol[0.5]} of {n} "
               f"draws and reaches less than 90% of the labelled best gain in {short[0.5]}; the estimate less one "
               f"standard error (`--confidence 0.8413`) in {viol[0.8413]} and {short[0.8413]}. Both goals at once (on "
               f"fresh items): {met[0.5]} vs {met[0.8413]} of {n}. The estimate's standard error at the picks is "
               f"{min(ses):.3f}-{max(ses):.3f} with {N_PROBES} probes, as large as the distance between a pick that "
               "keeps 95% and one that does not. The "
               f"default ({DEFAULT_CONFIDENCE:g}) holds the bound the user sets, since a pick that keeps less than "
               "`--min-retention` of the VLM's use is the failure no one sees without labels, and pays for it in "
               "gain where the zone's edge sits where the estimate reads low (expert-multilingual, expert-instruct). "
               "The standard error falls as 1/sqrt(N): more image probes narrow the margin.")
    better = [e for e in EXPERTS if gain(L[f"{e}/ta"], TP[f"{e}/ta"]["scores"], e) > gain(L[f"{e}/ta"], T[f"{e}/ta"]["scores"], e)]
    out.append(f"- `--per-layer` raised the target gain over the global pick for {len(better)} of {len(EXPERTS)} experts"
               + (f" ({', '.join(better)})" if better else "") + "; see the table below for what it cost in retention.")
    nm = [R["inspect"][e]["overall"]["norm_matched_scale"] for e in EXPERTS]
    zones = [L[f"{e}/ta"]["best_scale"] for e in EXPERTS]
    out.append(f"- No `inspect` statistic locates the zone: the norm-matched scale |tau_V|/|tau_E| spans "
               f"{min(nm):.2f}-{max(nm):.2f} across the experts while their TA zones sit at {', '.join(f'{z:.1f}' for z in zones)}; "
               "with three experts, a rank correlation is three distinct values, not evidence (table below).")
    return out + [""]


def draw_stats(R: dict[str, Any], e: str, level: float) -> dict[str, Any]:
    """How one --confidence level's picks fare over the probe draws of expert ``e`` (TA)."""
    lab = R["labelled"][f"{e}/ta"]
    gb = gain(lab, lab["best"], e)
    runs = R["draws"][e][str(level)]
    fracs = [gain(lab, t["scores"], e) / gb for t in runs]
    bench = [retention(lab, t["scores"]) for t in runs]
    fresh = [t["fresh_retention"] for t in runs]
    return {"picks": [t["scale"] for t in runs], "fracs": fracs, "bench": bench, "fresh": fresh,
            "se": [t.get("retention_se") or 0.0 for t in runs],
            "met": sum(f >= 0.9 and b >= MIN_RET for f, b in zip(fracs, bench)),
            "met_fresh": sum(f >= 0.9 and r >= MIN_RET for f, r in zip(fracs, fresh))}


def draws_section(R: dict[str, Any]) -> list[str]:
    lines = ["", "## The same rule on other probes", "",
             f"One probe file is one sample of the VLM's use. Here `tune` runs (TA) on {N_DRAWS} disjoint draws of "
             f"{N_PROBES} image and {N_PROBES} text probes each (`skillgraft zoo probes EXPERT -n {N_DRAWS * N_PROBES}`, "
             "split in order), with the estimate itself held to the bound (`--confidence 0.5`) and with the estimate "
             "less one standard error (`--confidence 0.8413`). *goal met*: draws whose pick reaches 90% of the labelled "
             "best gain and keeps 95% of `general` on the benchmark (on the fresh items).", "",
             "| expert | --confidence | picks | std. error at the pick | gain (% of labelled best) | general ret. benchmark | "
             "general ret. fresh | goal met: benchmark (fresh) |", "|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        for level in DRAW_LEVELS:
            d = draw_stats(R, e, level)
            lines.append(f"| {e} | {level:g} | {' '.join(f'{x:.3f}' for x in d['picks'])} | "
                         f"{' '.join(f'{x:.3f}' for x in d['se'])} | {' '.join(f'{100 * x:.0f}' for x in d['fracs'])} | "
                         f"{' '.join(f'{x:.3f}' for x in d['bench'])} | {' '.join(f'{x:.3f}' for x in d['fresh'])} | "
                         f"{d['met']} of {N_DRAWS} ({d['met_fresh']} of {N_DRAWS}) |")
    viol = {lv: sum(r < MIN_RET for e in EXPERTS for r in draw_stats(R, e, lv)["fresh"]) for lv in DRAW_LEVELS}
    short = {lv: sum(f < 0.9 for e in EXPERTS for f in draw_stats(R, e, lv)["fracs"]) for lv in DRAW_LEVELS}
    n = N_DRAWS * len(EXPERTS)
    lines += ["", "Over all " + str(n) + " draws: " + "; ".join(
        f"`--confidence {lv:g}` keeps less than 95% of `general` on fresh items in {viol[lv]} and reaches less than "
        f"90% of the labelled best gain in {short[lv]}" for lv in DRAW_LEVELS) + "."]
    return lines


def report(R: dict[str, Any], out: Path) -> str:
    L, T, TP, S, F, INS = R["labelled"], R["tune"], R["tune_pl"], R["signals"], R["fresh"], R["inspect"]
    synth = bool(R.get("synthetic"))
    lines = ["# Finding the Goldilocks zone without labels: `inspect` and `tune`", "",
             "Generated by `python research/tune_experiments.py --work tune-work --out docs"
             + (" --synthetic /tmp/sg-synth` (the micro-world zoo, seeded; CPU; `--synthetic` builds the ~1B triple of "
                "`bench/make_synthetic.py` for the last table)." if synth else
                "` (the micro-world zoo, seeded; CPU; add `--synthetic DIR` to time `inspect` on the ~1B triple of "
                "`bench/make_synthetic.py` too).")
             + " Every number below is read from the runs it records in `tune-work/`.", ""]
    lines += ["Most users of skill injection have no labelled benchmark for the new skill, and the scale only works "
              "inside a narrow, pair-specific band (`docs/findings.md`). Two commands help without labels:", "",
              "```bash",
              "skillgraft inspect VLM EXPERT --base BASE [--json pair.json] [--plot pair.png]",
              "skillgraft tune VLM EXPERT --base BASE --image-prompts images.jsonl --text-prompts skill.txt -o OUT",
              "```", "",
              "`inspect` reads no data and writes no checkpoint: per decoder layer and module kind it reports the "
              "norms of the VLM's and the expert's task vectors (`tau = theta - theta_base`), their ratio and cosine, "
              "the sign-conflict rate where both are non-negligible (`|tau| >= 1 x` that delta's RMS over its row "
              "block; `--threshold`), the expert delta's entropy-based effective rank (Roy and Vetterli, 2007: "
              "`exp(H(sigma / sum sigma))`) on `--rank-samples` matrices spread over depth, relative delta norms "
              "against the base, whether each model looks derived from the base, and whether the two tokenizers "
              "agree id for id. Without `--base` it reports the expert's distance from the VLM instead.", "",
              "`tune` needs two unlabelled files. `--image-prompts`: JSONL, one `{\"image\": path, \"prompt\": text}` "
              "per line, from the VLM's own use (paths relative to the file). `--text-prompts`: prompts in the "
              "skill's domain, JSONL `{\"prompt\": text}` or plain text, one per line. Prompts go through the "
              "model's chat template unless `--raw-prompts` (or, for image prompts, unless the prompt already holds "
              "the image token). A file with answers in it is refused. For the micro-world, "
              "`skillgraft zoo probes EXPERT -o DIR` writes both, drawn like the training data and never a "
              "benchmark item. `OUT` is the checkpoint `inject` would write for the pick, plus "
              "`skillgraft_tune.json` (every candidate) and `skillgraft_tune.md` (the curve); `--plot` adds "
              "`skillgraft_tune.png`. Flags: `--budget N` candidates (default 12), `--range 0:2`, `--per-layer` "
              f"(`--groups 3`), `--min-retention 0.95`, `--confidence {DEFAULT_CONFIDENCE:g}`, `--method`/`--density` as for `inject`, `--device cuda`.", ""]
    lines += summary(R)
    lines += ["## How `tune` decides", "",
              "`skillgraft tune` sees no answers. It has the VLM answer the image prompts (its own use) and the expert "
              "answer the text prompts (the skill), greedily, once. Each candidate scale is applied in place to the "
              "loaded VLM and scored by two teacher-forced passes:", "",
              "- **retention** (estimated): the VLM's confidence-weighted share of its own answers the candidate "
              "leaves unchanged, `sum_i c_i kept_i / sum_i c_i`, where `c_i` is the VLM's probability of its "
              "answer to prompt `i`. If the VLM is calibrated, that is the expected share of its right answers "
              "that survive. The probes are a sample of the VLM's use, so the estimate has a standard error `se` "
              "over them (a ratio of means, by the delta method: `sqrt(N/(N-1) sum_i (c_i (kept_i - r))^2) / sum_i c_i`); "
              "it is about 0.01 at the boundary with 256 probes. A candidate is feasible when the estimate less "
              "`z se` is at least 0.95, the sweep's own bound, with `z` the normal quantile of `--confidence` "
              + (f"(default {DEFAULT_CONFIDENCE:g}: the estimate itself)." if Z == 0 else
                 f"(default {DEFAULT_CONFIDENCE:g}: `z` = {Z:.2f}, a one-sided {100 * DEFAULT_CONFIDENCE:.0f}% lower "
                 "bound; 0.5 holds the estimate itself to the bound)."),
              "- **uptake**: the share of the VLM-to-expert gap closed in the likelihood of the expert's answers "
              "to the text prompts (sequence-level distillation's loss, the expert as teacher).", "",
              "The pick is the feasible candidate with the most uptake. The search scores 6 evenly spaced scales in "
              "(0, 2] and then bisects towards the retention boundary (or an uptake peak), at most 12 candidates by "
              "default. A candidate is scored only as far as it can matter: the image pass stops once retention can "
              "no longer reach the bound (the unscored prompts counted as kept), and uptake is measured only where "
              "retention holds.", "",
              "Why this retention estimate, and not the obvious alternatives (the share of answers kept, unweighted; "
              "a bound calibrated from the VLM's own variation with its attention dropout switched on; a bound on the "
              "likelihood of its answers): the table *Which retention signal tracks `general`* below measures each "
              "against `general` on the benchmark and on fresh items.", ""]
    # --- the goal table
    lines += ["## Label-free pick vs the labelled sweep (TA)", "",
              "Labelled: `skillgraft sweep ... --vary scale=0:1.5:0.1 --eval microworld` (16 points, 256 items per "
              "scenario), best target accuracy keeping >= 95% of `general`. Label-free: `skillgraft tune` with its "
              f"defaults on {N_PROBES} image and {N_PROBES} text probes from `skillgraft zoo probes` (disjoint from "
              "the benchmark's items); its checkpoint is then scored on the same benchmark. Time: *command* is the "
              "wall clock of the whole command, Python and library start-up included (about 5 s of CPU here, the "
              "same for both); *work* is the time the command itself records (the sweep: its baseline and trials, "
              "model loading included; tune: setup, search and writing the checkpoint). Every command runs on one "
              "thread (`OMP_NUM_THREADS=1`) on a machine shared with other jobs, so compare ratios within a row.", "",
              "| expert | labelled best | gain | general ret. | tune pick | gain (% of best) | general ret. | "
              "sweep: command / work | tune: command / work | time ratio: command / work | goal |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        lab, tu = L[f"{e}/ta"], T[f"{e}/ta"]
        g_best = gain(lab, lab["best"], e)
        g = gain(lab, tu["scores"], e)
        frac = g / g_best if g_best > 0 else None
        ret = retention(lab, tu["scores"])
        ratio, wratio = tu["wall_s"] / lab["wall_s"], tu["seconds"]["total_s"] / lab["work_s"]
        lines.append(
            f"| {e} | {lab['best_scale']:.1f} | {100 * g_best:+.1f} | {retention(lab, lab['best']):.3f} | "
            f"{tu['scale']:.3f} | {100 * g:+.1f} ({'–' if frac is None else f'{100 * frac:.0f}%'}) | {ret:.3f} | "
            f"{lab['wall_s']:.0f} s / {lab['work_s']:.1f} s | {tu['wall_s']:.1f} s / {tu['seconds']['total_s']:.1f} s | "
            f"{ratio:.2f} / {wratio:.2f} | {verdict(ret, frac, ratio, wratio)} |")
    lines += ["", "Gains in accuracy points on the expert's scenario; retention = `general` / the VLM's `general` "
              f"({L[EXPERTS[0] + '/ta']['baseline']['general']:.3f}).", ""]
    lines += [f"![{e}](tuning/{e}.png)" for e in EXPERTS] + [""]
    # --- methods
    lines += ["## Other methods", "", "The same comparison for DARE and TIES (density 0.5, seed 0).", "",
              "| expert | method | labelled best | gain | tune pick | gain | general ret. | time ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        for m in ("dare", "ties"):
            lab, tu = L[f"{e}/{m}"], T[f"{e}/{m}"]
            lines.append(f"| {e} | {m} | {lab['best_scale']:.1f} | {100 * gain(lab, lab['best'], e):+.1f} | "
                         f"{tu['scale']:.3f} | {100 * gain(lab, tu['scores'], e):+.1f} | {retention(lab, tu['scores']):.3f} | "
                         f"{tu['wall_s'] / lab['wall_s']:.2f} |")
    # --- per layer
    lines += ["", "## Per layer group vs global (TA)", "",
              "`--per-layer` starts from the global pick and moves scale between 3 groups of decoder layers "
              "(AdaMerging's idea, derivative-free), 12 more candidates.", "",
              "| expert | global pick | gain | general ret. | per-layer pick (groups) | gain | general ret. | time |",
              "|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        lab, g, p = L[f"{e}/ta"], T[f"{e}/ta"], TP[f"{e}/ta"]
        lines.append(f"| {e} | {g['scale']:.3f} | {100 * gain(lab, g['scores'], e):+.1f} | {retention(lab, g['scores']):.3f} | "
                     f"{' / '.join(f'{x:.3f}' for x in p['scales'])} | {100 * gain(lab, p['scores'], e):+.1f} | "
                     f"{retention(lab, p['scores']):.3f} | {p['wall_s']:.0f} s |")
    # --- retention of the picks
    lines += ["", "## Where the picks miss, and by how much", "",
              "Retention of every label-free pick three ways: `tune`'s estimate (probes, no labels), the benchmark "
              f"(256 `general` items) and {N_FRESH} fresh `general` items (neither benchmark nor probe items; the "
              f"population value the benchmark estimates). `--confidence {ALT:g}` is the same run with "
              + ("the estimate itself held to the bound (no margin)." if ALT == 0.5 else
                 f"the estimate less {z_of(ALT):.2f} standard errors held to the bound.") + "", "",
              "| expert | run | pick | estimate | std. error | benchmark | fresh | gain (% of labelled best) |",
              "|---|---|---|---|---|---|---|---|"]
    runs = [("tune ta", T, "ta"), (f"tune ta --confidence {ALT:g}", R["tune_alt"], "ta"), ("tune ta --per-layer", TP, "ta"),
            ("tune dare", T, "dare"), ("tune ties", T, "ties")]
    for e in EXPERTS:
        for name, group, m in runs:
            t, lab = group[f"{e}/{m}"], L[f"{e}/{m}"]
            g, gb = gain(lab, t["scores"], e), gain(lab, lab["best"], e)
            pick = f"{t['scale']:.3f}" if isinstance(t["scale"], float) else "/".join(f"{x:.2f}" for x in t["scales"])
            lines.append(f"| {e} | {name} | {pick} | {t['retention_estimate']:.3f} | {f3(t.get('retention_se'))} | "
                         f"{retention(lab, t['scores']):.3f} | {t['fresh_retention']:.3f} | {100 * g:+.1f} ({100 * g / gb:.0f}%) |")
    est_err = [abs(t["retention_estimate"] - t["fresh_retention"]) for grp in (T, R["tune_alt"]) for t in grp.values()]
    bench_err = [abs(retention(L[k], t["scores"]) - t["fresh_retention"]) for grp in (T, R["tune_alt"]) for k, t in grp.items()]
    lines += ["", f"Over these global picks, the estimate is off the fresh-item retention by {sum(est_err) / len(est_err):.3f} "
              f"on average (at most {max(est_err):.3f}); the benchmark is off it by {sum(bench_err) / len(bench_err):.3f} "
              f"(at most {max(bench_err):.3f}). Both picks and grades sit on the retention boundary, where either error "
              "decides which side of 0.95 a number lands."]
    lines += draws_section(R)
    # --- signals
    lines += ["", "## Which retention signal tracks `general`", "",
              "At every grid scale (TA), the label-free retention signals on the probes next to `general` "
              f"retention on the benchmark (256 items) and on {N_FRESH} fresh items. Mean absolute error against "
              "each, and the labelled outcome of the scale each rule would pick on the grid (most uptake where "
              "the rule holds). The dropout rules calibrate the bound from the VLM itself: its answers' variation "
              "with its own attention dropout switched on (5 draws).", "",
              "| expert | signal | MAE vs benchmark | MAE vs fresh | rule | pick | gain | general ret. |",
              "|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        sig, lab, fr = S[e], L[f"{e}/ta"], F[e]
        rules = [("weighted_kept", "weighted kept >= 0.95" + (" (tune)" if Z == 0 else ""),
                  lambda r: r["weighted_kept"] >= MIN_RET),
                 ("weighted_kept", f"weighted kept - {z_of(0.8413):.2f} se >= 0.95" + (" (tune)" if Z > 0.99 else ""),
                  lambda r: r["weighted_kept"] - z_of(0.8413) * r["weighted_se"] >= MIN_RET),
                 ("kept", "kept >= 0.95", lambda r: r["kept"] >= MIN_RET),
                 ("kept", f"kept >= dropout's ({sig['dropout_kept']:.3f})", lambda r: r["kept"] >= sig["dropout_kept"]),
                 ("nll_ratio", f"NLL ratio <= dropout's ({sig['dropout_nll'] / sig['vlm_nll']:.2f})",
                  lambda r: r["nll_ratio"] <= sig["dropout_nll"] / sig["vlm_nll"])]
        for key, name, holds in rules:
            if key == "nll_ratio":
                mae_b = mae_f = None
            else:
                mae_b = sum(abs(sig["rows"][s][key] - retention(lab, lab["points"][s])) for s in sig["rows"]) / len(GRID)
                mae_f = sum(abs(sig["rows"][s][key] - fr[s]) for s in sig["rows"]) / len(GRID)
            pick = rule_pick(sig, holds)
            sc = lab["points"][f"{pick:.1f}"]
            lines.append(f"| {e} | {key} | {f3(mae_b)} | {f3(mae_f)} | {name} | {pick:.1f} | "
                         f"{100 * gain(lab, sc, e):+.1f} | {retention(lab, sc):.3f} |")
    def mae(key: str, e: str) -> float:
        return sum(abs(S[e]["rows"][s][key] - F[e][s]) for s in F[e]) / len(F[e])

    w = [mae("weighted_kept", e) for e in EXPERTS]
    u = [mae("kept", e) for e in EXPERTS]
    lines += ["", f"The confidence-weighted share is off `general` retention on fresh items by {min(w):.3f}-{max(w):.3f} "
              f"on average, the unweighted share by {min(u):.3f}-{max(u):.3f}: counting every changed answer as a loss, "
              "also those the VLM was unsure of (and often wrong about), makes the unweighted share the more "
              "conservative, which costs most where the zone lies high. The dropout-calibrated bounds are stricter "
              "still: the VLM's own dropout changes few answers, so they rule out scales that keep 95% of `general`."]
    lines += ["", "The benchmark's own `general` retention, against the fresh items at the same scales "
              "(the noise any label-free pick is graded with):", "",
              "| expert | MAE benchmark vs fresh | largest gap | benchmark boundary | fresh boundary |", "|---|---|---|---|---|"]
    for e in EXPERTS:
        lab, fr = L[f"{e}/ta"], F[e]
        diffs = [abs(retention(lab, lab["points"][s]) - fr[s]) for s in fr]
        bb = max((float(s) for s in fr if retention(lab, lab["points"][s]) >= MIN_RET and all(
            retention(lab, lab["points"][f"{x:.1f}"]) >= MIN_RET for x in GRID if x <= float(s))), default=0.0)
        fb = max((float(s) for s in fr if all(fr[f"{x:.1f}"] >= MIN_RET for x in GRID if x <= float(s))), default=0.0)
        lines.append(f"| {e} | {sum(diffs) / len(diffs):.3f} | {max(diffs):.3f} | {bb:.1f} | {fb:.1f} |")
    # --- inspect
    lines += ["", "## Does an `inspect` statistic predict the zone?", "",
              "`skillgraft inspect VLM EXPERT --base BASE` on each pair (data-free), next to the labelled best "
              "feasible scale of each method. `norm-matched` is `|tau_V| / |tau_E|`, the scale at which the added "
              "expert delta is as large as the VLM's own; `method-matched` is `|tau_V| / |M(tau_E)|` with the "
              "method's own sparsified delta at scale 1.", "",
              "| expert | norm-matched | cosine | sign conflict | eff. rank (ratio) | rel. expert delta | last-layer ratio | "
              "ta best | dare best | ties best | tune (ta) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in EXPERTS:
        o = INS[e]["overall"]
        lines.append(f"| {e} | {o['norm_matched_scale']:.3f} | {o['cosine']:.3f} | {o['sign_conflict']:.3f} | "
                     f"{o['mean_effective_rank_ratio']:.3f} | {o['rel_expert']:.3f} | "
                     f"{INS[e]['per_layer'][-1]['ratio']:.3f} | {L[e + '/ta']['best_scale']:.1f} | "
                     f"{L[e + '/dare']['best_scale']:.1f} | {L[e + '/ties']['best_scale']:.1f} | {T[e + '/ta']['scale']:.3f} |")
    xs_stat = {k: [] for k in ("norm_matched", "method_matched", "cosine", "sign_conflict", "effective_rank", "last_layer_ratio")}
    ys: list[float] = []
    for e in EXPERTS:
        o = INS[e]["overall"]
        for m in METHODS:
            ys.append(L[f"{e}/{m}"]["best_scale"])
            xs_stat["norm_matched"].append(o["norm_matched_scale"])
            xs_stat["method_matched"].append(R["method_norms"][f"{e}/{m}"])
            xs_stat["cosine"].append(o["cosine"])
            xs_stat["sign_conflict"].append(o["sign_conflict"])
            xs_stat["effective_rank"].append(o["mean_effective_rank_ratio"])
            xs_stat["last_layer_ratio"].append(INS[e]["per_layer"][-1]["ratio"])
    lines += ["", "Spearman rank correlation with the labelled best feasible scale over the 9 expert x method "
              "pairs (1 or -1: the statistic orders the zones; near 0: it does not):", "",
              "| statistic | Spearman |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {f3(spearman(v, ys))} |" for k, v in xs_stat.items()]
    rho = {k: spearman(v, ys) for k, v in xs_stat.items()}
    top = sorted((k for k in rho if rho[k] is not None), key=lambda k: -abs(rho[k]))[:3]
    nm = [R["inspect"][e]["overall"]["norm_matched_scale"] for e in EXPERTS]
    lines += ["", "Plainly: no. The statistics with the largest correlations ("
              + ", ".join(f"{k.replace('_', ' ')} {rho[k]:+.2f}" for k in top)
              + ") get them by ranking the math expert apart from the other two; none says where a zone lies "
              f"(the norm-matched scale is {min(nm):.2f}-{max(nm):.2f} for zones from {min(ys):.1f} to {max(ys):.1f}), "
              f"the method-matched scale, the only one that differs between the methods of an expert, correlates at "
              f"{rho['method_matched']:+.2f}, and three experts cannot tell a predictor from a coincidence. The zone "
              "had to be found by measuring the merged model, which is what `tune` does."]
    lines += ["", "Method-matched scale per pair: " + ", ".join(
        f"{e.removeprefix('expert-')}/{m} {R['method_norms'][e + '/' + m]:.3f}" for e in EXPERTS for m in METHODS) + "."]
    # --- speed
    lines += ["", "## Cost of `inspect`", "",
              "`inspect` streams the three checkpoints once, like `inject`, and writes no checkpoint. Best of two "
              "interleaved runs of each command (wall clock; CPU seconds in brackets):", "",
              "| pair | inspect | TA inject | ratio |", "|---|---|---|---|"]
    for e in EXPERTS:
        i = INS[e]
        lines.append(f"| micro-world {e} | {i['inspect_wall_s']:.2f} s ({i['inspect_cpu_s']:.2f}) | "
                     f"{i['inject_wall_s']:.2f} s ({i['inject_cpu_s']:.2f}) | {i['inspect_wall_s'] / i['inject_wall_s']:.2f} |")
    if R.get("synthetic"):
        sy = R["synthetic"]
        a, b = min(sy["inspect_wall_s"]), min(sy["inject_wall_s"])
        lines.append(f"| synthetic ~1B triple (bench/make_synthetic.py, bf16; default threads) | {a:.1f} s ({min(sy['inspect_cpu_s']):.1f}) | "
                     f"{b:.1f} s ({min(sy['inject_cpu_s']):.1f}) | {a / b:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("tune-work"))
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--synthetic", type=Path, help="also time inspect vs inject on a synthetic ~1B triple built here")
    args = ap.parse_args(argv)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    R: dict[str, Any] = {"labelled": {}, "tune": {}, "tune_pl": {}, "tune_alt": {}, "signals": {}, "fresh": {},
                         "inspect": {}, "method_norms": {}, "draws": {}}
    for e in EXPERTS:  # a sweep and its tune runs back to back, so they see the same machine load
        for m in METHODS:
            k = f"{e}/{m}"
            R["labelled"][k] = cached(w / f"labelled-{e}-{m}.json", lambda: labelled_sweep(w, e, m))
            R["tune"][k] = cached(w / f"tune-{e}-{m}.json", lambda: tuned(w, e, m, False))
            if m == "ta":
                R["tune_pl"][k] = cached(w / f"tune-pl-{e}-{m}.json", lambda: tuned(w, e, m, True))
                R["tune_alt"][k] = cached(w / f"tune-c{ALT}-{e}-{m}.json",
                                          lambda: tuned(w, e, m, False, ("--confidence", str(ALT)), f"-c{ALT}"))
        R["signals"][e] = cached(w / f"signals-{e}.json", lambda: signals(w, e))
        R["fresh"][e] = cached(w / f"fresh-{e}.json", lambda: fresh_retention(w, e))
        R["inspect"][e] = cached(w / f"inspect-{e}.stats.json", lambda: inspected(w, e))
    for e in EXPERTS:
        for m in METHODS:
            delta = cached(w / f"delta-{e}-{m}.json", lambda: {"norm": method_delta_norm(e, m)})["norm"]
            v = R["inspect"][e]["overall"]["norm_vlm"]
            R["method_norms"][f"{e}/{m}"] = v / delta
    for e in EXPERTS:  # the same rules on other draws of probes (TA)
        files = probe_draws(w, e)
        R["draws"][e] = {}
        for level in DRAW_LEVELS:
            runs = []
            for k, f in enumerate(files):
                t = cached(w / f"tune-draw-{e}-{k}-{level}.json",
                           lambda: tuned(w, e, "ta", False, ("--confidence", str(level)), f"-draw{k}-c{level}", f))
                t["fresh_retention"] = cached(w / f"fresh-{t['out']}.json",
                                              lambda: {"r": fresh_retention_of(w / t["out"])})["r"]
                runs.append(t)
            R["draws"][e][str(level)] = runs
    for group in ("tune", "tune_pl", "tune_alt"):  # each pick's retention on the fresh items
        for k, t in R[group].items():
            name = t.get("out") or f"tune-{k.replace('/', '-')}" + ("-per-layer" if group == "tune_pl" else "")
            t["fresh_retention"] = cached(w / f"fresh-{name}.json", lambda: {"r": fresh_retention_of(w / name)})["r"]
    R["startup"] = cached(w / "startup.json", startup)
    if args.synthetic or (w / "synthetic-speed.json").is_file():
        R["synthetic"] = cached(w / "synthetic-speed.json", lambda: synthetic_speed(args.synthetic, w))
    (args.out / "tuning").mkdir(parents=True, exist_ok=True)
    for e in EXPERTS:
        plot_expert(args.out / "tuning" / f"{e}.png", e, R["labelled"][f"{e}/ta"], R["signals"][e], R["fresh"][e],
                    R["tune"][f"{e}/ta"]["scale"])
    (args.out / "tuning.md").write_text(report(R, args.out))
    print(f"wrote {args.out / 'tuning.md'}")


if __name__ == "__main__":
    main()

"""Run a sweep: search the space, score each point once, record everything in ``SWEEP/sweep.db``.

    from skillgraft.sweep.runner import SweepConfig, run_sweep
    run_sweep(SweepConfig(recipe, space, evaluator={"kind": "microworld"}, objective=...), "sweep/")

Rerunning with the same models, evaluator and objective on an existing ``SWEEP`` resumes it: every
point already scored is taken from the store (never recomputed), and only the rest are run. The
space, the search and the budget may change between runs (finished points are reused by key).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..evaluate import make_evaluator
from ..io.resolve import resolve
from ..pipeline import recipe_with_absolute_paths
from ..recipe import Recipe
from ..version import __version__
from .objective import Objective
from .ray_backend import LocalPool, RayPool, connect
from .report import write_report
from .search import make_search
from .space import Space, describe, point_key
from .store import BASELINE, DB_NAME, Store
from .worker import estimate_inplace_bytes


@dataclass
class SweepConfig:
    recipe: Recipe                   # the fixed settings: vlm, base, experts, mode, seed, parameters
    space: Space
    evaluator: dict[str, Any]        # an evaluator spec (see skillgraft.evaluate.base)
    objective: Objective
    search: str = "grid"
    trials: int | None = None
    search_seed: int = 0
    inplace: str = "auto"            # auto | always | never
    device: str = "cpu"
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_cpus_per_trial: float = 1.0
    ray_gpus_per_trial: float = 0.0
    allow_unmatched: bool = False
    report: bool = True
    max_trials_this_run: int | None = None   # stop after this many new trials (tests, time boxes)


@dataclass
class SweepResult:
    out_dir: Path
    computed: int
    reused: int
    failed: int
    best: dict[str, Any] | None
    backend: str
    seconds: float


def _abs_recipe(recipe: Recipe) -> Recipe:
    """Local paths made absolute and hub inputs pinned to their commits (a resumed sweep keeps its models)."""
    resolved = {"vlm": resolve(recipe.vlm, "vlm")}  # fail early on a missing VLM
    resolved.update({f"expert {i}": resolve(e.model, "expert") for i, e in enumerate(recipe.experts)})
    if recipe.base is not None:
        resolved["base"] = resolve(recipe.base, "base")
    return recipe_with_absolute_paths(recipe, resolved)


def identity(cfg: SweepConfig, recipe: Recipe) -> dict[str, Any]:
    """What must not change between runs of one sweep: the models, fixed settings, evaluator, objective."""
    fixed = recipe.model_dump(mode="json")
    for e in fixed["experts"]:  # the varied quantities may change; the models may not
        e.pop("scale", None)
        e.pop("density", None)
    fixed.pop("method", None)
    return {"recipe": fixed, "evaluator": cfg.evaluator, "objective": cfg.objective.to_json()}


def _check_identity(store: Store, ident: dict[str, Any]) -> None:
    old = store.get_meta("identity")
    if old is None:
        store.set_meta("identity", ident)
        return
    if json.dumps(old, sort_keys=True) != json.dumps(ident, sort_keys=True):
        diff = next(
            (k for k in ident if json.dumps(old.get(k), sort_keys=True) != json.dumps(ident[k], sort_keys=True)), "settings"
        )
        raise SkillgraftError(
            f"{store.dir} holds a sweep with a different {diff}; resume it with the same models, evaluator and "
            f"objective, or choose another output directory"
        )


def _choose_inplace(cfg: SweepConfig, recipe: Recipe, evaluator: Any, say: Callable[[str], None]) -> bool:
    if cfg.inplace == "never":
        return False
    if not evaluator.supports_loaded:
        if cfg.inplace == "always":
            raise SkillgraftError(f"--inplace always: the {evaluator.kind} evaluator scores checkpoint directories only")
        return False
    if recipe.dtype != "auto":
        if cfg.inplace == "always":
            raise SkillgraftError("--inplace always keeps the VLM's dtype; leave --dtype at auto")
        return False
    if cfg.inplace == "always" or cfg.ray_address:
        return True
    need, avail = estimate_inplace_bytes(recipe, cfg.space.methods, cfg.allow_unmatched)
    if cfg.device == "cpu" and need > 0.8 * avail:
        say(f"in-place sweep needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free: merging each point to disk")
        return False
    return True


def run_sweep(cfg: SweepConfig, out_dir: str | Path, *, log: Callable[[str], None] | None = print) -> SweepResult:
    """Run (or resume) the sweep into ``out_dir``; returns counts and the best point."""
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    out = Path(out_dir)
    recipe = _abs_recipe(cfg.recipe)
    evaluator = make_evaluator(cfg.evaluator)
    cfg.objective.check(evaluator.scenarios())
    if cfg.search == "grid":
        cfg.space.check_grid()
    search = make_search(cfg.search, cfg.space, cfg.trials, cfg.search_seed, storage_dir=out)
    if out.exists() and not out.is_dir():
        raise SkillgraftError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "sweep.db").is_file():
        raise SkillgraftError(f"{out} is not empty and holds no sweep; choose another output directory")
    if cfg.ray_address:  # connect before anything is written: a missing Ray leaves no sweep directory behind
        connect(cfg.ray_address)
    fresh = not out.exists()
    store = Store(out)
    try:
        _check_identity(store, identity(cfg, recipe))
        inplace = _choose_inplace(cfg, recipe, evaluator, say)
        store.set_meta("space", cfg.space.to_json())
        store.set_meta("search", {"name": cfg.search, "trials": cfg.trials, "seed": cfg.search_seed})
        store.set_meta("recipe", recipe.model_dump(mode="json"))
        store.set_meta("evaluator", cfg.evaluator)
        store.set_meta("objective", cfg.objective.to_json())
        store.set_meta("item_counts", evaluator.item_counts())
        runs = store.get_meta("runs", [])
        runs.append({"started": time.time(), "version": __version__, "search": cfg.search, "inplace": inplace,
                     "ray_address": cfg.ray_address, "python": platform.python_version()})
        store.set_meta("runs", runs)
        worker_kwargs = dict(recipe=recipe.model_dump(mode="json"), evaluator=cfg.evaluator, inplace=inplace,
                             methods=cfg.space.methods, device=cfg.device, allow_unmatched=cfg.allow_unmatched)
        computed, reused, failed = _loop(cfg, store, search, worker_kwargs, say)
        runs[-1]["seconds"] = round(time.perf_counter() - t_start, 3)
        runs[-1].update(computed=computed, reused=reused, failed=failed)
        store.set_meta("runs", runs)
        done = store.trials()
        if not done and failed:
            first = store.trials(state="failed")
            where = f" ({describe(first[0].params)})" if first else ""
            error = " | ".join((first[0].error or "").splitlines()) if first else "unknown error"
            raise SkillgraftError(f"every trial failed; the first{where}: {error}")
        best = max((t for t in done if t.objective is not None), key=lambda t: t.objective, default=None)
    except BaseException:
        if fresh:
            _remove_unscored(store, out)
        raise
    finally:
        store.close()
    if cfg.report:
        write_report(out)
    return SweepResult(out, computed, reused, failed, best.params if best else None,
                       "ray" if cfg.ray_address else ("in-place" if inplace else "streaming"),
                       time.perf_counter() - t_start)


def _remove_unscored(store: Store, out: Path) -> None:
    """Remove a sweep directory this run created when nothing was scored and it holds nothing but its store."""
    try:
        if store.trials(state="done", include_baseline=True):
            return
    except Exception:  # a store that cannot be read is no reason to hide the original error
        return
    store.close()
    if all(p.name.startswith((DB_NAME, "optuna.db")) for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def _loop(cfg: SweepConfig, store: Store, search: Any, worker_kwargs: dict[str, Any],
          say: Callable[[str], None]) -> tuple[int, int, int]:
    objective = cfg.objective
    backend = "ray" if cfg.ray_address else ("in-place" if worker_kwargs["inplace"] else "streaming")
    pool: Any = None

    def get_pool() -> Any:
        nonlocal pool
        if pool is None:
            if cfg.ray_address:
                pool = RayPool(cfg.ray_address, worker_kwargs, workers=cfg.ray_workers,
                               cpus_per_trial=cfg.ray_cpus_per_trial, gpus_per_trial=cfg.ray_gpus_per_trial)
                say(f"ray: {pool.capacity} worker(s)")
            else:
                pool = LocalPool(worker_kwargs)
        return pool

    try:
        base = store.baseline()
        if base is None:
            say("scoring the VLM alone (the baseline)")
            store.start(BASELINE, {"baseline": True}, search="baseline", backend=backend, seed=None, version=__version__)
            try:
                scores, timings = get_pool().baseline()
            except (KeyboardInterrupt, SystemExit, SkillgraftError):
                raise
            except Exception as e:  # the evaluator, not skillgraft, failed: say so in one line
                store.fail(BASELINE, f"{type(e).__name__}: {e}")
                raise SkillgraftError(f"the evaluator failed on the baseline (the VLM alone): {_one_line(e)}") from None
            store.finish(BASELINE, scores, timings, objective=None, target=None, retention=None, feasible=None)
            base = store.baseline()
            # a baseline from a fresh run: the derived columns of older trials (none, usually) follow it
            for t in store.trials():
                o, tg, r, f = objective.score(t.scores, base.scores)
                store.rescore(t.key, objective=o, target=tg, retention=r, feasible=f)
        say("baseline " + _fmt_scores(base.scores))
        finished = [t for t in store.trials() if t.objective is not None]
        search.replay([(t.params, t.objective) for t in finished],
                      [{"target": t.target, "shortfall": objective.shortfall(t.retention)} for t in finished])

        computed = reused = failed = 0
        waiting: dict[str, list[dict[str, Any]]] = {}  # key -> points asked while it was in flight
        exhausted = False
        n_total = getattr(search, "points", None)
        n_total = len(n_total) if n_total is not None else search.budget
        seen = 0
        while True:
            while not exhausted and (pool is None or len(pool.inflight) < pool.capacity):
                if cfg.max_trials_this_run is not None and computed + len(waiting) >= cfg.max_trials_this_run:
                    exhausted = True
                    break
                pts = search.ask(1)
                if not pts:
                    exhausted = True
                    break
                p = pts[0]
                key = point_key(p)
                seen += 1
                if key in waiting:
                    waiting[key].append(p)
                    continue
                old = store.done(key)
                if old is not None:
                    reused += 1
                    search.tell(p, old.objective, target=old.target, shortfall=objective.shortfall(old.retention))
                    continue
                store.start(key, p, search=cfg.search, backend=backend, seed=cfg.recipe.seed if "seed" not in p else p["seed"],
                            version=__version__)
                get_pool().submit(key, p)
                waiting[key] = [p]
            if pool is None or not pool.inflight:
                break
            key, result, err = pool.wait_one()
            pts = waiting.pop(key)
            if err is not None:
                failed += 1
                msg = f"{type(err).__name__}: {err}"
                store.fail(key, msg)
                say(f"[{seen}/{n_total}] {describe(pts[0])}  FAILED  {msg}")
                for p in pts:
                    search.tell(p, None)
                continue
            scores, timings = result
            o, tg, r, f = objective.score(scores, base.scores)
            store.finish(key, scores, timings, objective=o, target=tg, retention=r, feasible=f)
            computed += 1
            ret = f" retention {r:.3f}" if r is not None else ""
            say(f"[{seen}/{n_total}] {describe(pts[0])}  {_fmt_scores(scores)}  target {tg:.3f}{ret}"
                f"{'' if f else ' (infeasible)'}  {timings.get('total_s', 0):.1f}s")
            for p in pts:
                search.tell(p, o, target=tg, shortfall=objective.shortfall(r))
        return computed, reused, failed
    finally:
        if pool is not None:
            pool.close()


def _one_line(e: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _fmt_scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items())

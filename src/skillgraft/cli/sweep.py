"""``skillgraft sweep``: search merge hyperparameters (scale, density, method) for a VLM/expert pair.

Score many merges of EXPERT into VLM and find the Goldilocks zone. Example: skillgraft sweep VLM EXPERT --base BASE
--vary scale=0:1.5:0.1 --vary density=0.1,0.3,0.5,1.0 --method ta,dare,ties --eval microworld -o SWEEP.
Rerunning the same command on SWEEP resumes it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import SkillgraftError
from ..microworld.scenarios import scenarios_taught
from .args import EXIT_INTERRUPTED, add_command, add_recipe_args, add_verbosity, parse_assignment, recipe_from_args

EVALUATORS = ("microworld", "jsonl", "command", "python")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "sweep", run, __doc__)
    add_recipe_args(p, vlm_help="VLM checkpoint directory", expert_help="expert LLM checkpoint directory")
    p.add_argument("--method", default="ta", help="comma-separated methods to compare (default ta)")
    p.add_argument("--vary", action="append", default=[], metavar="NAME=SPEC",
                   help="a varied quantity: scale=0:1.5:0.1 (range, ends included), density=0.1,0.5,1 (list), "
                   "scale=0:2 (continuous; random/optuna); names: scale, density, seed, scale.LABEL, density.LABEL, "
                   "param.NAME. Repeatable")
    p.add_argument("--search", default="grid", choices=["grid", "random", "optuna"], help="search strategy (default grid)")
    p.add_argument("--trials", type=int, help="number of trials for random/optuna (total, resumed runs included)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random/optuna search (default 0)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default="microworld", choices=EVALUATORS,
                   help="evaluator (default microworld); python: your own scorer object from --eval-python")
    g.add_argument("--scenarios", help="micro-world scenarios to score (default: all)")
    g.add_argument("--limit", type=int, help="items per scenario / per file (default: all)")
    g.add_argument("--eval-file", help="jsonl: the {image, question, answer} file")
    g.add_argument("--max-new-tokens", type=int, default=32, help="jsonl: answer length cap (default 32)")
    g.add_argument("--prompt-template", default="{image} {question}",
                   help="jsonl, for models without a chat template: the prompt ({image}: the image token)")
    g.add_argument("--eval-command",
                   help="command: template with {model} (merged checkpoint) and {out} (a fresh dir); split into "
                   "arguments like a shell would and run WITHOUT a shell, {model} and {out} each replaced inside one argument")
    g.add_argument("--eval-shell", action="store_true",
                   help="command: run --eval-command through /bin/sh instead (pipes, redirections, variables); "
                   "{model} and {out} reach the shell as the variables SKILLGRAFT_MODEL and SKILLGRAFT_OUT, "
                   "never as text it parses")
    g.add_argument("--eval-json", help="command: JSON file to read metrics from ({out} and globs allowed)")
    g.add_argument("--eval-metric", action="append", default=[], metavar="NAME=PATH",
                   help="command: a score NAME read at dotted PATH in the JSON (e.g. general=results.mme.acc); repeatable")
    g.add_argument("--eval-python", metavar="MODULE:FACTORY",
                   help="python: a factory returning an object with evaluate_dir(path) (and optionally "
                   "evaluate_loaded(model, processor), supports_loaded=True)")
    g.add_argument("--eval-option", action="append", default=[], metavar="NAME=VALUE",
                   help="python: keyword argument for the factory; repeatable")
    g.add_argument("--target", help="comma-separated scenario(s) to maximise (default: the expert's skill)")
    g.add_argument("--retain", help="scenario whose score must be retained (default general; 'none' to disable)")
    g.add_argument("--min-retention", type=float, default=0.95, help="retain at least this fraction (default 0.95)")
    r = p.add_argument_group("execution")
    r.add_argument("--inplace", default="auto", choices=["auto", "always", "never"],
                   help="auto (default): load the VLM once and apply points in memory when it fits and the evaluator "
                   "can score a loaded model; never: merge each point to a temporary checkpoint")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    r.add_argument("--ray-address", help="run trials on a Ray cluster: auto or HOST:PORT")
    r.add_argument("--ray-workers", type=int, help="Ray actors (default: cluster CPUs / --ray-cpus-per-trial)")
    r.add_argument("--ray-cpus-per-trial", type=float, default=1.0)
    r.add_argument("--ray-gpus-per-trial", type=float, default=0.0)
    r.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    p.add_argument("-o", "--out", required=True, help="sweep directory (created; resumed when it holds a sweep)")
    add_verbosity(p)


def _evaluator_spec(args: argparse.Namespace) -> dict[str, Any]:
    from ..api import check_device  # deferred: torch, keeps --help fast
    from ..evaluate import CommandEvaluator, JsonlEvaluator, MicroworldEvaluator  # deferred: torch, keeps --help fast

    check_device(args.device)
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    if args.eval == "microworld":
        return MicroworldEvaluator(scen, args.limit, args.device).spec()
    if args.eval == "jsonl":
        if not args.eval_file:
            raise SkillgraftError("--eval jsonl needs --eval-file FILE.jsonl")
        return JsonlEvaluator(args.eval_file, limit=args.limit, device=args.device,
                              max_new_tokens=args.max_new_tokens, prompt_template=args.prompt_template).spec()
    if args.eval == "python":
        if not args.eval_python:
            raise SkillgraftError("--eval python needs --eval-python MODULE:FACTORY")
        opts = dict(parse_assignment(o, "--eval-option") for o in args.eval_option)
        return {"kind": "python", "target": args.eval_python, "options": opts}
    if not args.eval_command:
        raise SkillgraftError("--eval command needs --eval-command 'TEMPLATE with {model}'")
    metrics = {}
    for m in args.eval_metric:
        if "=" not in m:
            raise SkillgraftError(f"--eval-metric expects NAME=PATH, got {m!r}")
        k, v = m.split("=", 1)
        metrics[k.strip()] = v.strip()
    return CommandEvaluator(args.eval_command, args.eval_json, metrics, shell=args.eval_shell).spec()


def _check_numbers(args: argparse.Namespace) -> None:
    """Counts at least 1, fractions and resources finite and in range: refused before anything runs."""
    for flag, value in (("--trials", args.trials), ("--limit", args.limit), ("--ray-workers", args.ray_workers),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise SkillgraftError(f"{flag} must be at least 1")
    if not (math.isfinite(args.ray_cpus_per_trial) and args.ray_cpus_per_trial > 0):
        raise SkillgraftError("--ray-cpus-per-trial must be a positive number")
    if not (math.isfinite(args.ray_gpus_per_trial) and args.ray_gpus_per_trial >= 0):
        raise SkillgraftError("--ray-gpus-per-trial must be a number >= 0")
    if not 0 < args.min_retention <= 1.5:
        raise SkillgraftError("--min-retention must be a fraction such as 0.95")


def build_config(args: argparse.Namespace):
    """The sweep's configuration from its command-line arguments (checked before anything runs)."""
    from ..evaluate import make_evaluator  # deferred: torch, keeps --help fast
    from ..methods import METHODS  # deferred: torch, keeps --help fast
    from ..sweep.objective import Objective  # deferred: dataclasses, keeps --help fast
    from ..sweep.runner import SweepConfig  # deferred: torch, keeps --help fast
    from ..sweep.space import build_space  # deferred: torch, keeps --help fast

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise SkillgraftError("--method: give at least one method")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SkillgraftError(f"unknown method {bad[0]!r}; choose from {', '.join(sorted(METHODS))}")
    _check_numbers(args)
    if args.search in ("random", "optuna") and not args.trials:
        raise SkillgraftError(f"--search {args.search} needs --trials N")
    recipe = recipe_from_args(args, method=methods[0])
    labels = [e.label for e in recipe.experts]
    space = build_space(methods, args.vary, labels)
    if args.search == "grid":
        space.check_grid()
    spec = _evaluator_spec(args)
    ev = make_evaluator(spec)
    if args.target:
        target = [t.strip() for t in args.target.split(",") if t.strip()]
    else:
        target = ev.default_target() or (scenarios_taught([e.model for e in recipe.experts])
                                         if spec["kind"] == "microworld" else None)
        if not target:
            raise SkillgraftError("give --target SCENARIO: the score to maximise (the expert's skill)")
    if args.retain is None:
        retain = ev.default_retain()
    else:
        retain = None if args.retain.lower() == "none" else args.retain
    objective = Objective(target, retain, args.min_retention)
    return SweepConfig(
        recipe=recipe, space=space, evaluator=spec, objective=objective, search=args.search, trials=args.trials,
        search_seed=args.search_seed, inplace=args.inplace, device=args.device, ray_address=args.ray_address,
        ray_workers=args.ray_workers, ray_cpus_per_trial=args.ray_cpus_per_trial,
        ray_gpus_per_trial=args.ray_gpus_per_trial, allow_unmatched=args.allow_unmatched, report=not args.no_report,
    )


def run(args: argparse.Namespace) -> int:
    from ..sweep.analysis import load_results  # deferred: torch, keeps --help fast
    from ..sweep.report import REPORT, summary_lines  # deferred: torch, keeps --help fast
    from ..sweep.runner import run_sweep  # deferred: torch, keeps --help fast

    cfg = build_config(args)
    try:
        res = run_sweep(cfg, args.out, log=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    except KeyboardInterrupt:
        print(f"error: interrupted; every scored point is kept in {args.out}: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{res.computed} point(s) scored, {res.reused} reused from {args.out}"
          + (f", {res.failed} failed" if res.failed else "") + f" ({res.backend}, {res.seconds:.1f} s)")
    for line in summary_lines(load_results(args.out)):
        print(line)
    if cfg.report:
        print(f"report: {Path(args.out) / REPORT}")
    return 0

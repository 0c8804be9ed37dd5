"""The command line: a thin layer over the API. Bad input is one `error: ...` line and exit 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import SkillgraftError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a single `error: ...` line, like every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------- inject
def _add_inject(sub: argparse._SubParsersAction) -> None:
    from .api import DEFAULT_SHARD_SIZE
    from .methods import METHODS

    p = sub.add_parser(
        "inject",
        help="merge an expert LLM's skill into a VLM",
        description="Merge the language-model part of VLM with EXPERT relative to BASE; copy everything else. "
        "Example: skillgraft inject vlm/ expert/ --base base/ --method ta --scale 0.8 -o merged/",
    )
    p.add_argument("vlm", nargs="?", help="VLM checkpoint directory or hub id (an LLM also works)")
    p.add_argument("expert", nargs="?", help="expert LLM checkpoint directory or hub id")
    p.add_argument("--base", help="base LLM both derive from (needed by every task-vector method)")
    p.add_argument("--recipe", help="YAML recipe (several experts, per-expert scale/density); replaces VLM EXPERT")
    p.add_argument("--method", choices=sorted(METHODS), help="merge method (default ta)")
    p.add_argument("--scale", type=_floats, help="lambda: weight of the expert's task vector (default 1.0); "
                   "a comma list is a per-layer schedule, e.g. 0,1,1,0.5")
    p.add_argument("--density", type=float, help="fraction kept by dare/ties (default 1.0)")
    p.add_argument("--mode", choices=["inject", "symmetric"], help="inject (default): VLM kept whole")
    p.add_argument("--exclude", action="append", default=[], metavar="KINDS",
                   help="keep these LM modules from the VLM: attention, mlp, norm, embed, lm_head or a regex "
                   "on LM-relative names; comma-separated, repeatable (e.g. --exclude embed,lm_head)")
    p.add_argument("--schedule", type=_floats, help="multiplier of the scale over the decoder depth, e.g. 0,1,1,0")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter, repeatable")
    p.add_argument("--seed", type=int, help="seed for random methods (default 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="output dtype (default: the VLM's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"max bytes per output shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--allow-unmatched", action="store_true", help="copy VLM LM tensors that have no expert counterpart")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without reading weights")
    p.add_argument("-o", "--out", help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_inject)


def _floats(text: str) -> float | list[float]:
    """``0.8`` -> 0.8; ``0,1,1,0.5`` -> a schedule."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 and "," not in text else values


def _parse_param(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise SkillgraftError(f"--param expects NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), yaml.safe_load(value)


def recipe_from_args(args: argparse.Namespace):
    """A Recipe from `inject`-style arguments: a recipe file with flag overrides, or positional models."""
    from .recipe import Recipe

    overrides = {
        k: v
        for k, v in {"method": args.method, "mode": args.mode, "seed": args.seed, "dtype": args.dtype}.items()
        if v is not None
    }
    params = dict(_parse_param(p) for p in args.param)
    exclude = [x.strip() for item in args.exclude for x in item.split(",") if x.strip()]
    if exclude:
        overrides["exclude"] = exclude
    if args.schedule is not None:
        overrides["schedule"] = args.schedule if isinstance(args.schedule, list) else [args.schedule]
    if args.recipe:
        if args.vlm or args.expert:
            raise SkillgraftError("give either --recipe or VLM EXPERT, not both")
        data = Recipe.load(args.recipe).model_dump()
        if args.base:
            data["base"] = args.base
        if args.scale is not None or args.density is not None:
            for e in data["experts"]:
                e["scale"] = args.scale if args.scale is not None else e["scale"]
                e["density"] = args.density if args.density is not None else e["density"]
        data.update(overrides)
        data["parameters"] = {**data.get("parameters", {}), **params}
        return Recipe.from_dict(data, args.recipe)
    if not args.vlm or not args.expert:
        raise SkillgraftError("give VLM and EXPERT checkpoints (or --recipe FILE)")
    expert = {"model": args.expert}
    if args.scale is not None:
        expert["scale"] = args.scale
    if args.density is not None:
        expert["density"] = args.density
    data = {"vlm": args.vlm, "base": args.base, "experts": [expert], "parameters": params, **overrides}
    return Recipe.from_dict(data, "arguments")


def _cmd_inject(args: argparse.Namespace) -> int:
    from .api import inject, plan_only
    from .report import plan_table

    recipe = recipe_from_args(args)
    if args.dry_run:
        plan = plan_only(recipe, allow_unmatched=args.allow_unmatched)
        for w in plan.warnings:
            _warn(w)
        print(plan_table(plan))
        return 0
    if not args.out:
        raise SkillgraftError("give an output directory with -o OUT")
    result = inject(
        recipe,
        args.out,
        force=args.force,
        device=args.device,
        shard_size=args.shard_size,
        progress=not args.quiet,
        allow_unmatched=args.allow_unmatched,
        on_warning=_warn,
    )
    c = result.report["counts"]
    print(
        f"wrote {result.out_dir}: {c['merged']} tensors merged ({c['row_sliced']} row-sliced), "
        f"{c['copied']} copied, {result.report['seconds']:.1f} s"
    )
    return 0


# ------------------------------------------------------------------------------------- methods
def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for m in METHODS.values():
        flags = ", ".join(f for f, on in (("random", m.stochastic), ("density", m.uses_density), ("no base", not m.needs_base)) if on)
        print(f"{m.name:18} {m.summary}" + (f" [{flags}]" if flags else ""))
        print(f"{'':18} paper: {m.paper}")
        for prm in m.params:
            print(f"{'':18} --param {prm.name}={prm.default!r}: {prm.doc}")
    return 0


# ------------------------------------------------------------------------------ micro-world
def _add_microworld(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="inject each micro-world expert into the micro-world VLM and show the effect")
    p.add_argument("--out", default="demo", help="where report.md and the plot go (default ./demo)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    z = sub.add_parser("zoo", help="the shipped micro-world checkpoints")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True, parser_class=_Parser)
    zp = zsub.add_parser("path", help="print the directory of a shipped checkpoint")
    zp.add_argument("name", help="base, expert-multilingual, expert-instruct, expert-math or vlm")
    zp.set_defaults(func=_cmd_zoo_path)
    zb = zsub.add_parser("build", help="retrain the whole zoo from seed on the CPU")
    zb.add_argument("--out", required=True, help="directory for the rebuilt checkpoints")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--quick", action="store_true", help="a shrunken few-step smoke build")
    zb.add_argument("-q", "--quiet", action="store_true")
    zb.set_defaults(func=_cmd_zoo_build)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the micro-world benchmark")
    e.add_argument("model", help="checkpoint directory (a VLM, or an LLM for text-only questions)")
    e.add_argument("--suite", default="microworld", choices=["microworld"])
    e.add_argument("--scenarios", help="comma-separated subset of general,cross_lingual,instruction,math")
    e.add_argument("--limit", type=int, help="items per scenario (default: all)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="write the scores to this JSON file")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .microworld.demo import run_demo

    run_demo(Path(args.out), progress=not args.quiet)
    return 0


def _cmd_zoo_path(args: argparse.Namespace) -> int:
    from .microworld.zoo import zoo_path

    print(zoo_path(args.name))
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from .microworld.build import build_zoo

    timings = build_zoo(Path(args.out), seed=args.seed, quick=args.quick, progress=not args.quiet)
    for name, seconds in timings.items():
        print(f"{name:22} {seconds:8.1f} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .api import check_device
    from .evaluate.microworld import SCENARIOS, evaluate, format_table

    scenarios = None
    if args.scenarios:
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad:
            raise SkillgraftError(f"unknown scenario {bad[0]!r}; choose from {', '.join(SCENARIOS)}")
    check_device(args.device)
    if not Path(args.model).is_dir():
        raise SkillgraftError(f"model directory not found: {args.model}")
    scores = evaluate(args.model, scenarios=scenarios, limit=args.limit, device=args.device, progress=not args.quiet)
    print(format_table({Path(args.model).name: scores}))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return 0


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="skillgraft", description="Inject the skill of an expert LLM into a VLM by merging weights.")
    parser.add_argument("--version", action="version", version=f"skillgraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_inject, _add_methods, _add_microworld):
        add(sub)
    from .sweep.cli import add_parsers as add_sweep_parsers

    add_sweep_parsers(sub, _Parser)
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `skillgraft` console script."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args) or 0)
    except SkillgraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left in the output directory", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

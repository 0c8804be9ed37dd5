"""What every command shares: the parser class, the exit codes, the recipe flags and their parsing.

Nothing here imports torch: ``skillgraft --help`` and ``--version`` build every parser without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..errors import SkillgraftError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a single `error: ...` line, like every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


_COMMAND_PREFIX = re.compile(r"^``[^`]+``:\s*")


def add_command(sub: argparse._SubParsersAction, name: str, run: Handler | None = None, doc: str | None = None,
                **defaults: Any) -> Parser:
    """The parser of command ``name``, described once by ``doc`` (its module's docstring; by default
    ``run``'s): the first line, less a leading quoted command and colon, is its help in the list of
    commands, the rest the description its own ``--help`` opens with. ``run`` handles its arguments."""
    text = doc if doc is not None else (run.__doc__ if run is not None else None)
    summary, _, body = (text or "").strip().partition("\n")
    p = sub.add_parser(name, help=_COMMAND_PREFIX.sub("", summary).rstrip("."), description=body.strip() or None)
    if run is not None:
        p.set_defaults(func=run, **defaults)
    return p


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-v`` (more detail, repeatable) and ``-q`` (no progress bars, no library chatter)."""
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="say more: resolved checkpoints, the plan's counts (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars, and quiet transformers' own loading bars and logs")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: a log file gets no carriage-return bars."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


class _StderrHandler(logging.Handler):
    """``warning: ...`` / ``error: ...`` lines on whatever ``sys.stderr`` is at the time of the call."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        print(prefix + record.getMessage(), file=sys.stderr)


_handler = _StderrHandler()


def configure_output(verbose: int = 0, quiet: bool = False) -> None:
    """The CLI's logging: skillgraft's logger to stderr (warnings always; -v info, -vv debug), and
    transformers / huggingface_hub progress bars and logs off with -q or when stderr is not a terminal."""
    logger = logging.getLogger("skillgraft")
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    bars = not quiet and sys.stderr.isatty()
    if not bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if quiet:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "transformers" in sys.modules:  # already imported (the CLI called in-process): tell it directly
        from transformers.utils import logging as tf_logging  # deferred: transformers, set only if already loaded

        if not bars:
            tf_logging.disable_progress_bar()
        if quiet:
            tf_logging.set_verbosity_error()


def floats(text: str) -> float | list[float]:
    """``0.8`` -> 0.8; ``0,1,1,0.5`` -> a schedule."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 and "," not in text else values


def parse_assignment(text: str, flag: str = "--param") -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as YAML (``0.5`` -> 0.5, ``true`` -> True, ``l1`` -> 'l1')."""
    import yaml  # deferred: yaml, keeps --help fast

    if "=" not in text:
        raise SkillgraftError(f"{flag} expects NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise SkillgraftError(f"{flag} {text!r}: the value is not a number, word or list") from None


def add_recipe_args(p: argparse.ArgumentParser, *, vlm_help: str, expert_help: str) -> None:
    """The flags that describe a merge, shared by ``inject`` and ``sweep``."""
    p.add_argument("vlm", nargs="?", help=vlm_help)
    p.add_argument("expert", nargs="?", help=expert_help)
    p.add_argument("--base", help="base LLM both derive from (needed by every task-vector method)")
    p.add_argument("--recipe", help="YAML recipe (several experts, per-expert scale/density) or a mergekit config "
                   "(with --vlm); replaces VLM EXPERT")
    p.add_argument("--vlm", dest="vlm_flag", metavar="VLM",
                   help="with a mergekit config as --recipe: the VLM to merge into")
    p.add_argument("--mode", choices=["inject", "symmetric"], help="inject (default): VLM kept whole")
    p.add_argument("--exclude", action="append", default=[], metavar="KINDS",
                   help="keep these LM modules from the VLM: attention, mlp, norm, embed, lm_head or a regex "
                   "on LM-relative names; comma-separated, repeatable (e.g. --exclude embed,lm_head)")
    p.add_argument("--schedule", type=floats, help="multiplier of the scale over the decoder depth, e.g. 0,1,1,0")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter, repeatable")
    p.add_argument("--seed", type=int, help="seed for random methods (default 0)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: the VLM's)")
    p.add_argument("--allow-unmatched", action="store_true", help="copy VLM LM tensors that have no expert counterpart")
    p.add_argument("--allow-arch-mismatch", action="store_true",
                   help="merge an expert whose model_type differs from the VLM's language model (refused by default)")
    p.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="merge vocabulary rows although the tokenizers give some ids different tokens (refused by default)")


def recipe_from_args(args: argparse.Namespace, *, method: str | None = None):
    """A Recipe from the recipe flags: a recipe file with flag overrides, or positional models.

    ``method`` overrides ``args.method`` (a sweep passes its first method); ``args.scale`` and
    ``args.density`` are read when present.
    """
    from ..recipe import Recipe  # deferred: torch and pydantic, keeps --help fast

    method = method if method is not None else getattr(args, "method", None)
    scale, density = getattr(args, "scale", None), getattr(args, "density", None)
    overrides = {
        k: v
        for k, v in {"method": method, "mode": args.mode, "seed": args.seed, "dtype": args.dtype}.items()
        if v is not None
    }
    params = dict(parse_assignment(p) for p in args.param)
    exclude = [x.strip() for item in args.exclude for x in item.split(",") if x.strip()]
    if exclude:
        overrides["exclude"] = exclude
    for flag in ("allow_arch_mismatch", "allow_vocab_mismatch"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if args.schedule is not None:
        overrides["schedule"] = args.schedule if isinstance(args.schedule, list) else [args.schedule]
    if args.recipe:
        if args.vlm or args.expert:
            raise SkillgraftError("give either --recipe or VLM EXPERT, not both")
        data = _load_recipe_file(args.recipe, getattr(args, "vlm_flag", None)).model_dump()
        if args.base:
            data["base"] = args.base
        for e in data["experts"]:
            e["scale"] = scale if scale is not None else e["scale"]
            e["density"] = density if density is not None else e["density"]
        data.update(overrides)
        data["parameters"] = {**data.get("parameters", {}), **params}
        return Recipe.from_dict(data, args.recipe)
    if getattr(args, "vlm_flag", None):
        raise SkillgraftError("--vlm goes with a mergekit config as --recipe; otherwise give VLM EXPERT")
    if not args.vlm or not args.expert:
        raise SkillgraftError("give VLM and EXPERT checkpoints (or --recipe FILE)")
    expert: dict[str, Any] = {"model": args.expert}
    if scale is not None:
        expert["scale"] = scale
    if density is not None:
        expert["density"] = density
    data = {"vlm": args.vlm, "base": args.base, "experts": [expert], "parameters": params, **overrides}
    return Recipe.from_dict(data, "arguments")


def _load_recipe_file(path: str, vlm: str | None):
    """A skillgraft recipe, or a mergekit config converted with ``vlm`` as the model merged into."""
    from ..convert.mergekit import convert_mergekit, is_mergekit_config  # deferred: torch, keeps --help fast
    from ..recipe import Recipe, read_yaml  # deferred: torch and pydantic, keeps --help fast

    p = Path(path)
    if vlm is None:
        return Recipe.load(p)
    data = read_yaml(p, "recipe file")
    if not is_mergekit_config(data):
        raise SkillgraftError(f"{p} is a skillgraft recipe, which names its VLM itself; drop --vlm")
    return convert_mergekit(data, vlm, source=str(p))

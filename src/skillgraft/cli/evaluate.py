"""``skillgraft eval``: evaluate a checkpoint on the micro-world benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SkillgraftError
from .args import add_command, add_verbosity, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    e = add_command(sub, "eval", run, __doc__)
    e.add_argument("model", help="checkpoint directory or hub id (a VLM, or an LLM for text-only questions)")
    e.add_argument("--suite", default="microworld", choices=["microworld"])
    e.add_argument("--scenarios", help="comma-separated subset of general,cross_lingual,instruction,math")
    e.add_argument("--limit", type=int, help="items per scenario (default: all)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="write the scores to this JSON file")
    add_verbosity(e)


def run(args: argparse.Namespace) -> int:
    from ..api import check_device  # deferred: torch, keeps --help fast
    from ..evaluate.microworld import SCENARIOS, evaluate, format_table  # deferred: torch, keeps --help fast
    from ..io.reader import CheckpointReader  # deferred: torch, keeps --help fast
    from ..io.resolve import display_name, resolve_checkpoint  # deferred: torch, keeps --help fast

    scenarios = None
    if args.scenarios:
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad:
            raise SkillgraftError(f"unknown scenario {bad[0]!r}; choose from {', '.join(SCENARIOS)}")
    if args.limit is not None and args.limit < 1:
        raise SkillgraftError("--limit must be at least 1")
    check_device(args.device)
    model = resolve_checkpoint(args.model, "model")
    with CheckpointReader(model):  # headers, index paths and pickles checked before transformers loads it
        pass
    scores = evaluate(model, scenarios=scenarios, limit=args.limit, device=args.device, progress=show_progress(args))
    print(format_table({display_name(args.model): scores}))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return 0

"""``skillgraft eval``: score a checkpoint on the micro-world benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import SkillgraftError


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint on the micro-world benchmark")
    e.add_argument("model", help="checkpoint directory (a VLM, or an LLM for text-only questions)")
    e.add_argument("--suite", default="microworld", choices=["microworld"])
    e.add_argument("--scenarios", help="comma-separated subset of general,cross_lingual,instruction,math")
    e.add_argument("--limit", type=int, help="items per scenario (default: all)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="write the scores to this JSON file")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch and transformers: imported when the command runs
    from ..api import check_device
    from ..evaluate.microworld import SCENARIOS, evaluate, format_table

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

"""``skillgraft inspect``: data-free diagnostics of a VLM/expert pair (task vectors per layer, lineage, tokenizer).

Stream the language-model tensors of VLM, EXPERT and BASE once and report, per decoder layer and module kind, the
norms of the VLM's and the expert's task vectors, their ratio and cosine, their sign-conflict rate, relative delta
norms, sampled effective ranks, lineage and tokenizer checks. Writes no checkpoint.
Example: skillgraft inspect vlm/ expert/ --base base/ --json pair.json --plot pair.png
"""

from __future__ import annotations

import argparse

from ..extras import require
from .args import add_command, add_verbosity, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "inspect", run, __doc__, merges=True)
    p.add_argument("vlm", help="VLM checkpoint directory or hub id")
    p.add_argument("expert", help="expert LLM checkpoint directory or hub id")
    p.add_argument("--base", help="base LLM both derive from (without it: the expert's distance from the VLM)")
    p.add_argument("--json", metavar="F", help="write every statistic to this JSON file")
    p.add_argument("--plot", metavar="F.png", help="draw the per-layer statistics (needs matplotlib)")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="an entry is non-negligible when |delta| >= THRESHOLD x the delta's RMS (default 1.0)")
    p.add_argument("--rank-samples", type=int, default=8, help="matrices whose effective rank is computed (default 8)")
    p.add_argument("--allow-unmatched", action="store_true", help="skip VLM LM tensors without an expert counterpart")
    add_verbosity(p)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        require("matplotlib", "--plot")
    from ..api import inspect, inspect_json, inspect_plot, inspect_table  # deferred: torch, keeps --help fast

    ins = inspect(args.vlm, args.expert, args.base, threshold=args.threshold, rank_samples=args.rank_samples,
                  progress=show_progress(args), allow_unmatched=args.allow_unmatched,
                  workers=getattr(args, "workers", 1))
    print(inspect_table(ins))
    if args.json:
        print(f"wrote {inspect_json(ins, args.json)}")
    if args.plot:
        print(f"wrote {inspect_plot(ins, args.plot)}")
    return 0

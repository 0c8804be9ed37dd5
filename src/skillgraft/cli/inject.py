"""``skillgraft inject``: merge an expert LLM's skill into a VLM.

Merge the language-model part of VLM with EXPERT relative to BASE; copy everything else.
Example: skillgraft inject vlm/ expert/ --base base/ --method ta --scale 0.8 -o merged/
"""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_SHARD_SIZE
from ..errors import SkillgraftError
from ..memory import parse_size
from .args import add_command, add_recipe_args, add_verbosity, floats, recipe_from_args, show_progress, warn


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "inject", run, __doc__, merges=True)
    add_recipe_args(p, vlm_help="VLM checkpoint directory or hub id (an LLM also works)",
                    expert_help="expert LLM checkpoint directory or hub id, a skill directory "
                    "(skillgraft skill extract) or a PEFT LoRA adapter directory")
    p.add_argument("--method", help="merge method (default ta; `skillgraft methods` lists them)")
    p.add_argument("--scale", type=floats, help="lambda: weight of the expert's task vector (default 1.0); "
                   "a comma list is a per-layer schedule, e.g. 0,1,1,0.5")
    p.add_argument("--density", type=floats, help="fraction kept by sparsifying methods (default 1.0); a comma list "
                   "is a per-layer schedule like --scale")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"max bytes per output shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--max-memory", metavar="SIZE", help="peak memory the merge stays under, e.g. 4GB (default: half "
                   "the available memory, at most 1.25 GiB); refused up front if a tensor cannot be merged within it")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything that needs no weights (numbers, OUT, shard size, headers, index paths, "
                   "tokenizers), print the plan and exit")
    p.add_argument("-o", "--out", help="output directory (written atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is a previous skillgraft output (never a directory of other files or an input)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the finished output to this hub model repository "
                   "(org/name; created if missing; needs a hub token)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--ignore-lineage", action="store_true",
                   help="merge a skill even if its base fingerprint does not match the VLM's language model")
    add_verbosity(p)


def run(args: argparse.Namespace) -> int:
    from ..api import inject, memory_notes, plan_only  # deferred: torch, keeps --help fast
    from ..io.push import check_pushable, push_to_hub  # deferred: torch, keeps --help fast
    from ..report import plan_table  # deferred: torch, keeps --help fast

    recipe = recipe_from_args(args)
    protect = [args.recipe] if args.recipe else []
    try:
        max_memory = parse_size(args.max_memory, "memory size") if args.max_memory else None
    except ValueError as e:
        raise SkillgraftError(str(e)) from None
    if args.dry_run:
        plan = plan_only(recipe, allow_unmatched=args.allow_unmatched, ignore_lineage=args.ignore_lineage, out=args.out, force=args.force,
                         shard_size=args.shard_size, protect=protect)
        for w in plan.warnings:
            warn(w)
        print(plan_table(plan))
        print("\n".join(memory_notes(recipe, allow_unmatched=args.allow_unmatched, max_memory=max_memory,
                                      workers=getattr(args, "workers", 1))))
        return 0
    if not args.out:
        raise SkillgraftError("give an output directory with -o OUT")
    if args.push_to_hub:
        check_pushable(args.push_to_hub)  # before the merge, not after an hour of it
    result = inject(
        recipe,
        args.out,
        force=args.force,
        device=args.device,
        shard_size=args.shard_size,
        progress=show_progress(args),
        allow_unmatched=args.allow_unmatched,
        protect=protect,
        ignore_lineage=args.ignore_lineage,
        max_memory=max_memory,
        workers=getattr(args, "workers", 1),
    )
    c = result.report["counts"]
    print(
        f"wrote {result.out_dir}: {c['merged']} tensors merged ({c['row_sliced']} row-sliced), "
        f"{c['copied']} copied, {result.report['seconds']:.1f} s"
    )
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}: {push_to_hub(result.out_dir, args.push_to_hub, private=args.private)}")
    return 0

"""``skillgraft skill``: skill vectors: extract one from an expert, describe skills, export one as a LoRA adapter.

A skill is an expert's task vector (expert minus base) stored on its own, small, with a fingerprint of its base.
A skill directory or a PEFT LoRA adapter directory can be given wherever an EXPERT is (inject, sweep, recipes),
without --base for task-vector methods.
"""

from __future__ import annotations

import argparse
import json

from ..defaults import DEFAULT_SHARD_SIZE
from .args import DTYPE_CHOICES, Parser, add_command, add_verbosity, show_progress

FORMAT_CHOICES = ("full", "lowrank", "bitdelta", "sparse")


def register(sub: argparse._SubParsersAction) -> None:
    ssub = add_command(sub, "skill", doc=__doc__).add_subparsers(dest="skill_cmd", required=True, parser_class=Parser)

    e = add_command(ssub, "extract", run_extract)
    e.add_argument("expert", help="expert LLM checkpoint directory or hub id")
    e.add_argument("--base", required=True, help="the base LLM the expert was fine-tuned from")
    e.add_argument("-o", "--out", required=True, help="skill directory to write (atomically)")
    e.add_argument("--format", choices=FORMAT_CHOICES, default="full",
                   help="full: the delta as it is; lowrank: truncated SVD per matrix; bitdelta: 1-bit signs + a "
                   "scale per row (BitDelta); sparse: the largest entries (default full)")
    e.add_argument("--rank", type=int, help="lowrank: rank per matrix")
    e.add_argument("--energy", type=float, help="lowrank: smallest rank keeping this fraction of each matrix's "
                   "squared norm, e.g. 0.9")
    e.add_argument("--density", type=float, help="sparse: fraction of entries kept, e.g. 0.03")
    e.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the stored values (default: the expert's)")
    e.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"max bytes per file (default {DEFAULT_SHARD_SIZE})")
    e.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    add_verbosity(e)

    i = add_command(ssub, "info", run_info)
    i.add_argument("skill", help="skill or PEFT LoRA adapter directory")
    i.add_argument("--json", action="store_true", help="print JSON")

    li = add_command(ssub, "list", run_list)
    li.add_argument("dir", help="folder holding skill / adapter directories")
    li.add_argument("--json", action="store_true", help="print JSON")

    x = add_command(ssub, "export-lora", run_export)
    x.add_argument("skill", help="skill directory (or a PEFT LoRA adapter of the VLM's base LLM)")
    x.add_argument("--vlm", required=True, help="the VLM the adapter is for (directory or hub id)")
    x.add_argument("-o", "--out", required=True, help="adapter directory to write (atomically)")
    x.add_argument("--scale", type=float, default=1.0, help="merge weight folded into the adapter (default 1.0)")
    x.add_argument("--rank", type=int, help="rank for factorising a skill that is not stored low-rank")
    x.add_argument("--energy", type=float, help="or: keep this fraction of each matrix's squared norm")
    x.add_argument("--ignore-lineage", action="store_true", help="export even if the skill's base fingerprint "
                   "does not match the VLM's language model")
    x.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    add_verbosity(x)


def run_extract(args: argparse.Namespace) -> int:
    """store EXPERT - BASE as a skill directory

    Stream the expert and its base one tensor at a time and write SKILL: skill.safetensors (plain causal-LM names),
    skill.json (sources, settings, per-tensor norms and errors, base fingerprint) and a README.md card.
    Example: skillgraft skill extract expert/ --base base/ --format lowrank --rank 64 -o skill/
    """
    from ..api import SkillSettings, extract_skill  # deferred: torch, keeps --help fast
    from ..skills.info import format_info, skill_info  # deferred: torch, keeps --help fast

    settings = SkillSettings(format=args.format, rank=args.rank, energy=args.energy, density=args.density,
                             dtype=args.dtype)
    extract_skill(args.expert, args.base, args.out, settings, force=args.force, shard_size=args.shard_size,
                  progress=show_progress(args))
    print(format_info(skill_info(args.out)))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """describe a skill or LoRA adapter directory"""
    from ..api import skill_info  # deferred: torch, keeps --help fast
    from ..skills.info import format_info  # deferred: torch, keeps --help fast

    info = skill_info(args.skill)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """list the skills and LoRA adapters in a folder (a skill library)"""
    from ..api import list_skills  # deferred: torch, keeps --help fast
    from ..skills.info import format_list  # deferred: torch, keeps --help fast

    items = list_skills(args.dir)
    if args.json:
        print(json.dumps(items, indent=1))
    elif not items:
        print(f"no skills or LoRA adapters in {args.dir}")
    else:
        print(format_list(items))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """write a skill as a PEFT LoRA adapter on a VLM's own modules

    Write a PEFT LoRA adapter whose targets are the VLM's language-model modules, with the scale folded in:
    PeftModel.from_pretrained(vlm_model, ADAPTER) then computes what `skillgraft inject VLM SKILL --scale S` writes,
    without a merged checkpoint. Example: skillgraft skill export-lora skill/ --vlm vlm/ --scale 0.8 -o adapter/
    """
    from ..api import export_lora  # deferred: torch, keeps --help fast

    result = export_lora(args.skill, args.vlm, args.out, scale=args.scale, rank=args.rank, energy=args.energy,
                         force=args.force, ignore_lineage=args.ignore_lineage)
    s = result.summary
    print(f"wrote {result.out_dir}: {s['targets']} LoRA targets (ranks {s['ranks']}), "
          f"{s['modules_to_save']} modules saved whole, scale {s['scale']}")
    return 0

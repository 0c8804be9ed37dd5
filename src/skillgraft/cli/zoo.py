"""``skillgraft zoo``: the shipped micro-world checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..microworld.zoo import zoo_path
from .args import Parser, add_command, add_verbosity, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    zsub = add_command(sub, "zoo", doc=__doc__).add_subparsers(dest="zoo_cmd", required=True, parser_class=Parser)
    zp = add_command(zsub, "path", run_path)
    zp.add_argument("name", help="base, expert-multilingual, expert-instruct, expert-math, vlm or expert-multilingual-lora")
    zb = add_command(zsub, "build", run_build)
    zb.add_argument("--out", required=True, help="directory for the rebuilt checkpoints")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--quick", action="store_true", help="a shrunken few-step smoke build")
    add_verbosity(zb)
    zr = add_command(zsub, "probes", run_probes)
    zr.add_argument("name", help="expert-multilingual, expert-instruct or expert-math")
    zr.add_argument("-o", "--out", required=True, help="directory to write (new or empty)")
    zr.add_argument("-n", type=int, default=256, help="prompts per file (default 256)")


def run_path(args: argparse.Namespace) -> int:
    """print the directory of a shipped checkpoint"""
    print(zoo_path(args.name))
    return 0


def run_build(args: argparse.Namespace) -> int:
    """retrain the whole zoo from seed on the CPU"""
    from ..microworld.build import build_zoo  # deferred: torch and transformers, keeps --help fast

    timings = build_zoo(Path(args.out), seed=args.seed, quick=args.quick, progress=show_progress(args))
    for name, seconds in timings.items():
        print(f"{name:22} {seconds:8.1f} s")
    return 0


def run_probes(args: argparse.Namespace) -> int:
    """write unlabelled probe prompts for `skillgraft tune` on the micro-world

    Write DIR/image_prompts.jsonl (with DIR/images/) and DIR/text_prompts.jsonl for an expert: prompts drawn like the
    training data, never a benchmark item, never an answer. Example: skillgraft zoo probes expert-multilingual -o probes/
    """
    from ..microworld.probes import write_probes  # deferred: torch and PIL (an extra), keeps --help fast

    files = write_probes(args.name, args.out, args.n)
    print(f"wrote {files['image_prompts']} and {files['text_prompts']} ({args.n} prompts each)")
    return 0

"""``skillgraft convert``: turn a mergekit config into a skillgraft recipe.

Convert a mergekit YAML into a skillgraft recipe that merges the same way into VLM (mergekit's defaults kept:
TIES normalises, DARE rescales to the L1 norm; gradients become per-layer schedules).
Example: skillgraft convert mergekit.yml --vlm llava-1.5-7b-hf/ -o recipe.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SkillgraftError
from .args import add_command, add_verbosity


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert", run, __doc__)
    p.add_argument("config", help="mergekit YAML config")
    p.add_argument("--vlm", required=True, help="the VLM to merge into (directory or hub id); when it is one of "
                   "the config's models it takes that model's place")
    p.add_argument("-o", "--out", help="recipe file to write (default: print it)")
    p.add_argument("--force", action="store_true", help="replace an existing recipe file")
    add_verbosity(p)


def run(args: argparse.Namespace) -> int:
    from ..convert.mergekit import convert_mergekit  # deferred: torch, keeps --help fast

    recipe = convert_mergekit(args.config, args.vlm)
    if not args.out:
        print(recipe.to_yaml(), end="")
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SkillgraftError(f"{out} exists; pass --force to replace it")
    out.write_text(recipe.to_yaml())
    print(f"wrote {out}: {recipe.method} ({recipe.mode} mode), {len(recipe.experts)} expert(s); "
          f"run it with: skillgraft inject --recipe {out} -o OUT")
    return 0

"""``skillgraft tune``: choose the scale from unlabelled prompts (no answers needed), then inject.

Find the merge scale without labels: candidates are applied in place to the VLM and scored on your image prompts
(how many of the VLM's own answers survive) and text prompts in the skill's domain (how close the answers come to
the expert's); the pick is written like `skillgraft inject`, with skillgraft_tune.json and skillgraft_tune.md.
Example: skillgraft tune vlm/ expert/ --base base/ --image-prompts images.jsonl --text-prompts skill.txt -o tuned/
"""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_SHARD_SIZE
from ..extras import require
from .args import add_command, add_recipe_args, add_verbosity, recipe_from_args, show_progress, warn


CONFIDENCE = 0.8413  # tune.objective.DEFAULT_CONFIDENCE (not imported: it would import torch before --help)


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, e.g. 0:2, got {text!r}") from None
    return lo, hi


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "tune", run, __doc__)
    add_recipe_args(p, vlm_help="VLM checkpoint directory", expert_help="expert LLM checkpoint directory")
    p.add_argument("--method", help="merge method (default ta)")
    p.add_argument("--density", type=float, help="fraction kept by dare/ties (default 1.0)")
    p.add_argument("--image-prompts", required=True, metavar="FILE",
                   help='JSONL of {"image": path, "prompt": text} from the VLM\'s own use (no answers)')
    p.add_argument("--text-prompts", required=True, metavar="FILE",
                   help='prompts in the skill\'s domain: JSONL of {"prompt": text}, or plain text, one per line')
    g = p.add_argument_group("search")
    g.add_argument("--range", type=_range, default=(0.0, 2.0), metavar="LOW:HIGH", help="scales searched (default 0:2)")
    g.add_argument("--budget", type=int, default=12, help="candidates scored (default 12; again for --per-layer)")
    g.add_argument("--per-layer", action="store_true", help="then tune one scale per group of decoder layers")
    g.add_argument("--groups", type=int, default=3, help="layer groups for --per-layer (default 3)")
    g.add_argument("--min-retention", type=float, default=0.95,
                   help="keep at least this estimated share of the VLM's own answers (default 0.95)")
    g.add_argument("--confidence", type=float, default=CONFIDENCE, metavar="P",
                   help="one-sided confidence that the retention clears --min-retention, from the estimate's "
                        f"standard error over the image prompts (default {CONFIDENCE:g}; 0.5: the estimate itself)")
    g.add_argument("--max-prompts", type=int, help="use at most this many prompts of each file")
    g.add_argument("--max-new-tokens", type=int, default=16, help="answer length the teachers generate (default 16)")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    g.add_argument("--raw-prompts", action="store_true", help="use prompts as written, without the chat template")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"max bytes per output shard (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it is a previous skillgraft output (never a directory of other files or an input)")
    p.add_argument("--plot", action="store_true", help="also draw the curve as skillgraft_tune.png (needs matplotlib)")
    add_verbosity(p)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        require("matplotlib", "--plot")
    from ..api import TuneSettings, tune  # deferred: torch, keeps --help fast

    recipe = recipe_from_args(args)
    settings = TuneSettings(scale_range=args.range, budget=args.budget, per_layer=args.per_layer, groups=args.groups,
                            min_retention=args.min_retention, confidence=args.confidence,
                            max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, max_prompts=args.max_prompts, raw_prompts=args.raw_prompts)
    result = tune(recipe, args.image_prompts, args.text_prompts, args.out, settings=settings, device=args.device,
                  force=args.force, shard_size=args.shard_size, progress=show_progress(args),
                  allow_unmatched=args.allow_unmatched, plot=args.plot, on_warning=warn)
    c = result.chosen
    scale = (f"{result.scale:.3f}" if isinstance(result.scale, float)
             else "per layer " + ",".join(f"{x:.3f}" for x in result.scale))
    print(f"picked scale {scale}: estimated retention {c.retention:.3f}, uptake {c.uptake:.3f} ({len(result.candidates)} candidates, "
          f"{result.timings['total_s']:.1f} s)")
    print(f"wrote {result.out_dir} (skillgraft_tune.md: the curve)")
    return 0

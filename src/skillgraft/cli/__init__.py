"""The command line: a thin layer over the API, one module per command.

Bad input is one `error: ...` line on stderr and exit status 2; an interrupt is exit status 130.
Each command module has ``register(subparsers)`` (``args.add_command``: the module's docstring is the
command's help and description); its handler imports the API (and torch with it) only when the command
runs, so ``skillgraft --help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import signal
import sys

from ..version import __version__
from ..errors import SkillgraftError
from ..extras import missing_extra_message
from ..memory import merge_process_policy
from . import convert, demo, evaluate, inject, inspect, methods, report, skill, sweep, tune, zoo
from .args import EXIT_INTERRUPTED, EXIT_USAGE, Parser, configure_output

COMMANDS = (inject, convert, methods, sweep, report, demo, zoo, evaluate, skill, inspect, tune)


def build_parser() -> Parser:
    parser = Parser(prog="skillgraft", description="Inject the skill of an expert LLM into a VLM by merging weights.")
    parser.add_argument("--version", action="version", version=f"skillgraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `skillgraft` console script."""
    args = build_parser().parse_args(argv)
    configure_output(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    restore = None
    if getattr(args, "merges", False):
        # process-wide allocator and thread policy: the command line's choice, never a library call's
        args.workers, restore = merge_process_policy()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args) or 0)
    except SkillgraftError as e:
        one_line = " | ".join(line.strip() for line in e.for_cli().splitlines() if line.strip())
        print(f"error: {one_line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left in the output directory", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that brings it
        msg = missing_extra_message(e.name or "", f"skillgraft {args.command}")
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)
        if restore is not None:
            restore()

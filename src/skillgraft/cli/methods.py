"""``skillgraft methods``: the merge methods, their parameters and papers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..methods import METHODS  # torch: imported when the command runs

    for m in METHODS.values():
        flags = ", ".join(f for f, on in (("random", m.stochastic), ("density", m.uses_density), ("no base", not m.needs_base)) if on)
        print(f"{m.name:18} {m.summary}" + (f" [{flags}]" if flags else ""))
        print(f"{'':18} paper: {m.paper}")
        for prm in m.params:
            print(f"{'':18} --param {prm.name}={prm.default!r}: {prm.doc}")
    return 0

"""``skillgraft methods``: list merge methods and their parameters."""

from __future__ import annotations

import argparse

from .args import add_command


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "methods", run, __doc__)


def run(args: argparse.Namespace) -> int:
    from ..methods import METHODS  # deferred: torch, keeps --help fast

    for m in METHODS.values():
        flags = ", ".join(f for f, on in (("random", m.stochastic), ("density", m.uses_density),
                                          ("no base", not m.needs_base)) if on)
        print(f"{m.name:18} {m.summary}" + (f" [{flags}]" if flags else ""))
        print(f"{'':18} paper: {m.paper}")
        print(f"{'':18} parts: {m.composition()}")
        if m.whole_matrix((2, 2)):
            print(f"{'':18} memory: holds each 2-D tensor whole in float32 for its SVD (one matrix at a time)")
        else:
            print(f"{'':18} memory: streams every tensor in row blocks")
        for note in m.statistics():
            print(f"{'':18} statistics pass: {note}")
        for prm in m.params:
            print(f"{'':18} --param {prm.name}: {prm.describe()}. {prm.doc}")
    return 0

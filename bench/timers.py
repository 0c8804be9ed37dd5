"""Busy-time counters for benchmark scripts: wrap functions where they are looked up, sum their
seconds across threads (shared by check_cost.py and time_split.py)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict


def add_timers(targets: list[tuple[object, str, str]]) -> dict[str, float]:
    """Replace ``owner.name`` for each ``(owner, name, label)`` by a timed wrapper; the returned dict
    accumulates each label's seconds (all threads together)."""
    busy: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    for owner, name, label in targets:
        orig = getattr(owner, name)

        def timed(*a, _orig=orig, _label=label, **k):
            t = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                with lock:
                    busy[_label] += time.perf_counter() - t

        setattr(owner, name, timed)
    return busy

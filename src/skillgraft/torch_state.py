"""Process-wide torch settings, changed only for the duration of a ``with`` block and then restored.

Library calls must leave the caller's process as they found it: a notebook that calls
``evaluate`` or ``build_zoo`` keeps its own thread count and determinism flags afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_settings(*, threads: int | None = None, flush_denormal: bool | None = None,
                   deterministic: bool | None = None, warn_only: bool = False) -> Iterator[None]:
    """Set the intra-op thread count, denormal flushing and deterministic algorithms; restore on exit."""
    before_threads = torch.get_num_threads()
    before_det = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    before_flush = None
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if flush_denormal is not None:
            # set_flush_denormal returns False where the CPU does not support it; no query exists, so the
            # previous state is taken to be off (torch's default)
            before_flush = False
            torch.set_flush_denormal(flush_denormal)
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before_threads)
        if before_flush is not None:
            torch.set_flush_denormal(before_flush)
        if deterministic is not None:
            torch.use_deterministic_algorithms(before_det, warn_only=before_warn)

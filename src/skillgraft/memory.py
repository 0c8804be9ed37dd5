"""Memory: the budget a merge runs under, and the allocator policy of the command line.

``max_memory`` bounds the peak resident memory of the process during a merge: the engine sizes its
row blocks, its read-ahead and what it may hold between passes to stay under it, and refuses up
front, saying why, when a tensor cannot be merged within it. The default is sized to the machine:
half of the memory available when the run starts, at most ``DEFAULT_CAP``.

``merge_process_policy`` (allocator and torch threads) is process-wide and only the command-line
entry point calls it: a library caller keeps their allocator and thread count as they are (the
budget holds either way; see BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable

GiB = 2**30
DEFAULT_CAP = int(1.25 * GiB)
HEAP_LIMIT = 96 * 2**20  # allocator policy: blocks up to this size stay on the heap for reuse

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in a size such as ``5GB``, ``500MB``, ``2GiB`` or a plain integer; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"not a {what}: {text!r} (use e.g. 4GB, 500MB, 2GiB)")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return int(value)


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int:
    """Memory the kernel says is available to new work (MemAvailable), else total physical memory."""
    avail = _meminfo("MemAvailable")
    if avail is not None:
        return avail
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * GiB


def default_max_memory() -> int:
    """The default budget: half the available memory, at most ``DEFAULT_CAP``."""
    return min(DEFAULT_CAP, available_bytes() // 2)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # deferred: only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the kernel (glibc ``malloc_trim(0)``), in every arena.

    Row blocks of different sizes, freed by other threads than the ones that allocated them, leave
    holes inside the heap that stay resident (measured: 1.3 GB free inside a 1.7 GB heap during a
    TIES merge whose live data was 0.45 GB). This changes no allocator setting. False where glibc
    is not available.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class HeapGuard:
    """Keeps freed-but-resident heap memory from pushing the process past ``limit`` bytes of RSS.

    Called between row blocks: when RSS is over ``limit`` and has grown by ``slack`` since the last
    release, the free pages go back to the kernel (``release_free_memory``). What is really in use
    is what the budget planned; only the allocator's holes are released.
    """

    def __init__(self, limit: int, slack: int = 64 * 2**20):
        self.limit, self.slack = limit, slack
        self.after = 0  # RSS after the last release
        self.releases = 0
        self.enabled = _libc() is not None

    def __call__(self) -> None:
        if not self.enabled:
            return
        rss = rss_bytes()
        if rss > self.limit and rss > self.after + self.slack:
            release_free_memory()
            self.releases += 1
            self.after = rss_bytes()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameter numbers (glibc malloc.h)


def tune_allocator() -> bool:
    """Process-wide glibc malloc policy for merging (the command line calls this; libraries should not).

    Freed tensor blocks up to ``HEAP_LIMIT`` stay on one heap for reuse instead of going back to the
    kernel after every block (fresh pages are zeroed in page faults, which costs more than the
    arithmetic on them); one arena for all threads, since the reader thread's buffers are freed by
    the merge thread. Returns False where glibc is not available (nothing is changed).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, HEAP_LIMIT)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_LIMIT)
    libc.mallopt(_M_ARENA_MAX, 1)
    return True


def merge_process_policy() -> tuple[int, Callable[[], None]]:
    """The command line's process-wide settings for a merge: (merge workers, a function restoring
    the thread count).

    The allocator policy above, and one torch intra-op thread with one merge worker per core: row
    blocks are merged side by side in threads instead of each op being split across cores (on a
    busy machine OpenMP's barriers make split ops several times slower; measured in BENCHMARKS.md).
    """
    import torch  # deferred: torch, memory.py is imported by the CLI before any merge

    tune_allocator()
    before = torch.get_num_threads()
    workers = max(1, min(os.cpu_count() or 1, before))
    torch.set_num_threads(1)
    return workers, lambda: torch.set_num_threads(before)

"""Handler statistics, kept in memory shared by the handler process and its owner.

The handler is the only writer; the owner reads whenever it likes (a torn read of two counters
is possible and harmless). Latencies go into a log-linear histogram: four buckets per power of
two of nanoseconds, so a percentile is known within 19%.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

__all__ = ["Stats", "StatsBlock"]

_COUNTERS = ("faults", "pages", "bytes", "errors", "events", "wakes", "poisoned", "copies")
_BUCKETS = 4 * 64
_SUB = 4


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of what a handler did."""

    #: Page-fault events read (after merging faults on the same page).
    faults: int
    #: Pages filled, and their bytes.
    pages: int
    bytes: int
    #: Ranges the store could not read; their faulting pages were poisoned.
    errors: int
    #: Non-fault events read (fork, remap, remove, unmap).
    events: int
    #: Faults on pages already filled, answered with a wake.
    wakes: int
    #: Pages poisoned.
    poisoned: int
    #: UFFDIO_COPY calls made.
    copies: int
    #: Per-fault service time in microseconds (event read to page filled): percentiles.
    latency_p50_us: float
    latency_p90_us: float
    latency_p99_us: float


class StatsBlock:
    """The shared counters; create before fork, write in the handler, read anywhere."""

    def __init__(self) -> None:
        self._mmap = mmap.mmap(-1, 8 * (len(_COUNTERS) + _BUCKETS))  # MAP_SHARED: survives fork
        self._words = memoryview(self._mmap).cast("Q")
        self._hist = len(_COUNTERS)

    def add(self, counter: int, amount: int = 1) -> None:
        self._words[counter] = (self._words[counter] + amount) % (1 << 64)

    def record_latency(self, nanoseconds: int) -> None:
        bucket = min(int(_SUB * math.log2(nanoseconds)), _BUCKETS - 1) if nanoseconds > 0 else 0
        self._words[self._hist + bucket] += 1

    def snapshot(self) -> Stats:
        counts = [self._words[i] for i in range(len(_COUNTERS))]
        hist = [self._words[self._hist + b] for b in range(_BUCKETS)]
        return Stats(*counts, *(self._percentile(hist, q) for q in (0.5, 0.9, 0.99)))

    @staticmethod
    def _percentile(hist: list[int], q: float) -> float:
        total = sum(hist)
        if not total:
            return 0.0
        seen = 0
        for bucket, count in enumerate(hist):
            seen += count
            if seen >= q * total:
                return 2 ** ((bucket + 1) / _SUB) / 1000.0  # upper edge of the bucket, in us
        return 0.0


FAULTS, PAGES, BYTES, ERRORS, EVENTS, WAKES, POISONED, COPIES = range(len(_COUNTERS))

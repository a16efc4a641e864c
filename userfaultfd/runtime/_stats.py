"""The runtime handler's statistics, in memory it shares with its owner (see _counters).

The block is a memfd named :data:`NAME`: ``uffd top`` finds each server of a program by that
name in ``/proc/PID/maps`` and reads its counters from outside (``StatsBlock.reading``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from .._counters import SharedCounters

__all__ = ["NAME", "Stats", "StatsBlock"]

#: The name of every block's memfd (``/memfd:userfaultfd-stats-2 (deleted)`` in /proc/PID/maps).
#: A change of the layout below changes the name, so no reader misreads another layout.
NAME = "userfaultfd-stats-2"

_COUNTERS = ("faults", "pages", "bytes", "errors", "events", "wakes", "poisoned", "copies",
             "restarts", "zeros", "prefetched", "resident", "evicted", "written_back", "dirty",
             "write_errors")  # fmt: skip


@final
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
    #: Handlers the supervisor had to start again after one died.
    restarts: int
    #: Pages the store said were zero, mapped without a read.
    zeros: int
    #: Pages installed ahead of any fault from a recorded working set (``prefetch=``).
    prefetched: int
    #: An out-of-core array's pages (``lazy(budget=...)``; 0 otherwise): in memory now, given
    #: back so far, written back to the source so far, written since their last write-back, and
    #: write-backs that failed (the pages stay in memory, dirty; ``flush()`` raises).
    resident: int
    evicted: int
    written_back: int
    dirty: int
    write_errors: int
    #: Per-fault service time in microseconds (event read to page filled): percentiles.
    latency_p50_us: float
    latency_p90_us: float
    latency_p99_us: float
    #: How the running handler answers faults: "native" (the C fast path answers those it
    #: can from the store's mapping) or "python" (see runtime/_answer.py).
    path: str = "python"
    #: Why pages were last poisoned or a handler could not serve ("" if never): it reaches
    #: the program even when the handler's log cannot (a program whose stderr is a pipe).
    last_error: str = ""


#: Words after the counters: the running handler's pid, whether a prefetch is still on its way,
#: whether the handler takes the native path; the flushes asked for, the flushes done and the
#: errno of the last one (0: durable) (see Server.flush).
_PRIVATE = 6


class StatsBlock(SharedCounters):
    """The runtime handler's counters."""

    #: Counters (with the private words) and note bytes of every block.
    WORDS, TEXT = len(_COUNTERS) + _PRIVATE, 1024
    #: The bytes a block takes (its memfd's size).
    LENGTH = SharedCounters.length(WORDS, TEXT)

    def __init__(self) -> None:
        super().__init__(self.WORDS, text=self.TEXT, name=NAME)

    @classmethod
    def read(cls, data: bytes) -> StatsBlock:
        """A read-only block over ``data``, the bytes of a block read from another process."""
        return cls.reading(data, cls.WORDS, cls.TEXT)

    def snapshot(self) -> Stats:
        counts = {name: self.value(i) for i, name in enumerate(_COUNTERS)}
        p50, p90, p99 = (self.percentile_us(q) for q in (0.5, 0.9, 0.99))
        path = "native" if self.value(NATIVE) else "python"
        return Stats(**counts, latency_p50_us=p50, latency_p90_us=p90, latency_p99_us=p99,
                     path=path, last_error=self.noted())  # fmt: skip


(FAULTS, PAGES, BYTES, ERRORS, EVENTS, WAKES, POISONED, COPIES, RESTARTS, ZEROS, PREFETCHED,
 RESIDENT, EVICTED, WRITTEN_BACK, DIRTY, WRITE_ERRORS,
 HANDLER_PID, PREFETCHING, NATIVE, FLUSH_ASKED, FLUSH_DONE, FLUSH_ERRNO,
 ) = range(len(_COUNTERS) + _PRIVATE)  # fmt: skip

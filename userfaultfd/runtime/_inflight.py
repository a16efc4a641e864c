"""Reads in flight turned into pages: what a fault asks the fetcher for, and how the bytes that
arrive are installed.

Design note
-----------
- The faulting page's read goes first (demand), then the rest of its window, then, for a
  sequential stream, the read-ahead the policy chooses. A fault on a page whose read is in
  flight joins that read; its bytes wake it when they are installed.
- A sequential stream is followed by markers: the first page of each read of the read-ahead is
  kept back when its bytes arrive, so the reader faults there, and that fault tops the read-ahead
  up by what the reader has consumed while the page is installed from memory (``_held``). So the
  requests keep pace with the reader, a read at a time, and the read-ahead never drains. Without
  markers the reader would run through the read-ahead without a fault and then wait a round
  trip at its end.
- A prefetch (a recorded working set) is installed without waking, then one WAKE per run (REAP's
  order): threads blocked in it wake once the whole run is in.
- A read that failed poisons only the pages a thread waits on; if it failed quickly, each of
  them is asked for alone first (a bad chunk of a pack must not cost its neighbours).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import final

from . import _stats
from ._fetch import Fetch, Fetcher
from ._fill import PROGRAM, Fill, Filler, Outcome, Source, store_failed
from ._policy import Policy
from ._ranges import RegionState, unsettled_runs
from ._stats import StatsBlock

__all__ = ["RECORD", "Reads"]

_log = logging.getLogger("userfaultfd.runtime")
#: How long one turn of the loop may spend asking for the working set (faults come between).
_PREFETCH_SLICE = 0.002

#: A working-set record: each fill a fault caused, as (store offset, length), in order. A
#: record of length 0 fills nothing: ``record=`` writes one per fault, (the faulting page's
#: offset, 0), just before its fill if it asks for one (what ``uffd trace`` reads).
RECORD = struct.Struct("<QQ")


def _without_marker(
    region: RegionState, first: int, last: int, marker: int, waited: set[int]
) -> list[tuple[int, int]]:
    """[first, last) as runs to place, with the marker page (at store offset ``marker``) as an
    empty run (c, c) to hold back, unless a thread already waits on it."""
    index = (marker - region.offset) // region.page_size if marker >= region.offset else -1
    if not first <= index < last or region.at(index) in waited:
        return [(first, last)]
    runs = [(first, index), (index, index), (index + 1, last)]
    return [(a, b) for a, b in runs if a < b or a == index]


@final
class Reads:
    """Reads in flight and what becomes of them: the fetcher, the marker pages held back, the
    installs to try again, the prefetch. It places pages through ``filler`` and answers with an
    :class:`Outcome`: ``CHANGED`` asks the loop to read the pending events and call again; it
    never reads events itself. ``sources`` is the loop's map of sources by key (read only)."""

    def __init__(
        self, fetcher: Fetcher, filler: Filler, policy: Policy, stats: StatsBlock,
        sources: dict[int, Source], prefetch: str | None,
    ) -> None:  # fmt: skip
        self.fetcher = fetcher
        self.policy = policy
        self.stats = stats
        self._filler = filler
        self._by_key = sources
        self._retry: deque[Fetch] = deque()  # fetches whose install met EAGAIN
        self._held: dict[tuple[int, int], bytes] = {}  # marker pages kept back, by store offset
        self._prefetch = prefetch
        self._prefetching = False
        self._records: Iterator[tuple[int, int]] = iter(())  # the working set not yet asked for
        self._more = False  # records are left in it
        #: A fill that must end (in the background): what the store cannot give is poisoned.
        self.background = False

    @property
    def idle(self) -> bool:
        return not self.fetcher.pending

    def close(self) -> None:
        self.fetcher.close()

    def request(
        self, source: Source, region: RegionState, index: int, start: int, end: int
    ) -> Outcome:
        """Ask for the faulting page's bytes first, then the rest of the window and, for a
        sequential stream, the window after it; the fault is answered when its bytes arrive."""
        page = region.page_size
        offset = region.offset + index * page
        held = self._held.pop((source.key, offset), None)
        if held is not None:  # a marker page: its bytes are here already
            outcome = self._filler.place(source, region, index, index + 1, Fill.COPY,
                                         self._filler.buffer(held))  # fmt: skip
            if outcome is not Outcome.DONE:
                return outcome
        else:
            fetch = self.fetcher.covering(source.key, offset)
            if fetch is not None:
                fetch.waiters.append((source.key, region.at(index), time.perf_counter_ns()))
                self.fetcher.promote(fetch)
            else:
                waiter = (source.key, region.at(index), time.perf_counter_ns())
                self.ask(source, region, index, end, demand=True, waiter=waiter)
        self.ask(source, region, start, end, demand=False)
        ahead = self.policy.readahead(index, start, end, region.pages, page, region.stream)
        if ahead is not None and ahead[0] < ahead[1]:
            first, last = ahead[0], min(ahead[1], region.pages)
            self.ask(source, region, first, last, demand=False, markers=True)
        return Outcome.DONE

    def install_held(self, source: Source, region: RegionState, first: int, last: int) -> Outcome:
        """Place the marker pages kept back in [first, last): for a fill that must end (in the
        background, a drain), which no reader's fault will ask for."""
        page = region.page_size
        lo, hi = region.offset + first * page, region.offset + last * page
        # The held pages are few (one a read of the read-ahead): look at them, not the range.
        for key, offset in sorted(k for k in self._held if k[0] == source.key and lo <= k[1] < hi):
            index = (offset - region.offset) // page
            outcome = self._filler.place(
                source,
                region,
                index,
                index + 1,
                Fill.COPY,
                self._filler.buffer(self._held.pop((key, offset))),
            )
            if outcome is not Outcome.DONE:
                return outcome
        return Outcome.DONE

    def ask(
        self, source: Source, region: RegionState, first: int, last: int, *, demand: bool,
        waiter: tuple[int, int, int] | None = None, markers: bool = False,
        prefetch: bool = False,
    ) -> None:  # fmt: skip
        """Submit reads for the pages of [first, last) that are neither settled nor being read,
        split at the fetch unit. With ``demand``, only the run that starts at ``first``; with
        ``markers``, each read's first page is its marker."""
        assert self._filler.store is not None
        page = region.page_size
        unit_pages = max(1, self.fetcher.unit // page)
        for a, b in list(unsettled_runs(region, first, last)):
            index = a
            while index < b:
                offset = region.offset + index * page
                covering = self.fetcher.covering(source.key, offset)
                if covering is not None:
                    index = max(index + 1, -(-(covering.end - region.offset) // page))
                    continue
                if (source.key, offset) in self._held:  # a marker: its bytes are here
                    index += 1
                    continue
                stop, zero = self._filler.run_of_kind(region, index, min(b, index + unit_pages))
                size = (stop - index) * page
                if zero:
                    self._filler.place(source, region, index, stop, Fill.KNOWN_ZERO)
                else:
                    fetch = Fetch(source.key, offset, size, demand, prefetch=prefetch,
                                  marker=offset if markers else -1)  # fmt: skip
                    if waiter is not None:
                        fetch.waiters.append(waiter)
                    self.fetcher.submit(fetch)
                if demand:
                    return
                index = stop
            if demand:
                return

    def install_completed(self) -> Outcome:
        """Place the bytes of every read that has arrived. ``CHANGED``: an install met EAGAIN;
        it is kept to try again once the loop has read the pending events and calls again."""
        while done := [*self._retry, *self.fetcher.completed()]:
            self._retry.clear()
            for position, fetch in enumerate(done):
                if self._install(fetch) is Outcome.CHANGED:
                    self._retry.extend(done[position:])
                    return Outcome.CHANGED
                self.fetcher.release(fetch)
        self.prefetch_more()
        return Outcome.DONE

    def _install(self, fetch: Fetch) -> Outcome:
        source = self._by_key.get(fetch.key)
        if source is None or source.uffd.closed:
            return Outcome.DONE
        if fetch.error is not None:
            return self._fetch_failed(source, fetch)
        waited = {address for _key, address, _t in fetch.waiters}
        for region in list(source.map.regions):
            page = region.page_size
            lo, hi = max(fetch.offset, region.offset), min(fetch.end, region.offset + region.length)
            if lo >= hi:
                continue
            first, last = (lo - region.offset) // page, -(-(hi - region.offset) // page)
            for a, b in list(unsettled_runs(region, first, last)):
                for c, d in _without_marker(region, a, b, fetch.marker, waited):
                    src = fetch.address + region.offset + c * page - fetch.offset
                    if d == c:  # the marker: kept back until the reader faults on it
                        self._held[(fetch.key, region.offset + c * page)] = ctypes.string_at(
                            src, page
                        )
                        continue
                    outcome = self._filler.place(source, region, c, d, Fill.COPY, src,
                                          wake=not fetch.prefetch)  # fmt: skip
                    if outcome is not Outcome.DONE:
                        return outcome
            if fetch.prefetch:
                source.uffd.wake(region.at(first), (last - first) * page)
                self.stats.add(_stats.PREFETCHED, last - first)
        now = time.perf_counter_ns()
        for _key, _address, asked in fetch.waiters:
            self.stats.record_latency(now - asked)
        return Outcome.DONE

    def _fetch_failed(self, source: Source, fetch: Fetch) -> Outcome:
        """The store could not give ``fetch``'s bytes: each page a thread waits on is asked for
        alone (if the store failed quickly), or poisoned."""
        self.fetcher.release(fetch)  # no longer in flight: its pages may be asked for again
        assert fetch.error is not None
        store_failed(self.stats, self._filler.store, fetch.offset, fetch.size, fetch.error)
        for _key, address, asked in fetch.waiters:
            region = source.map.find(address)
            if region is None:
                continue
            index = (address - region.address) // region.page_size
            if region.settled[index]:
                continue
            if fetch.size > region.page_size and fetch.failed_quickly:
                self.ask(source, region, index, index + 1, demand=True,
                          waiter=(fetch.key, address, asked))  # fmt: skip
                continue
            outcome = self._filler.place(source, region, index, index + 1, Fill.POISON)
            if outcome is not Outcome.DONE:
                return outcome
        if self.background:  # the fill must end: what the store cannot give is poisoned
            for region in list(source.map.regions):
                page = region.page_size
                lo = max(fetch.offset, region.offset)
                hi = min(fetch.end, region.offset + region.length)
                if lo < hi:
                    first, last = (lo - region.offset) // page, -(-(hi - region.offset) // page)
                    for a, b in list(unsettled_runs(region, first, last)):
                        outcome = self._filler.place(source, region, a, b, Fill.POISON)
                        if outcome is not Outcome.DONE:
                            return outcome
        return Outcome.DONE

    def start_prefetch(self) -> None:
        """Ask for a recorded working set, in its order, behind any demand read, a few reads
        at a time (:meth:`prefetch_more`): a file of any length never keeps a fault waiting.
        The stats say when it is all in (``PREFETCHING`` back to 0: serve() waits for it)."""
        if self._prefetch is None:
            return
        try:
            with open(self._prefetch, "rb") as f:
                data = f.read()
        except OSError as err:
            _log.warning("prefetch: cannot read %s: %s", self._prefetch, err)
            data = b""
        self._records = RECORD.iter_unpack(data[: len(data) // RECORD.size * RECORD.size])
        self._prefetching = self._more = True
        self.prefetch_more()

    @property
    def prefetch_ready(self) -> bool:
        """Whether more of the working set can be asked for now (the loop then polls without
        waiting, as for a background fill): records are left and reads in flight are few."""
        return self._more and len(self.fetcher.pending) < 2 * self.fetcher.workers

    def prefetch_more(self) -> None:
        """Submit the working set's next records while fewer than twice the fetcher's
        threads are in flight, for at most a couple of milliseconds (the loop answers faults
        in between); once all are submitted and in, the prefetch is over."""
        source = self._by_key.get(PROGRAM)
        if not self._prefetching:
            return
        deadline = time.monotonic() + _PREFETCH_SLICE
        while len(self.fetcher.pending) < 2 * self.fetcher.workers:
            if time.monotonic() > deadline:
                return  # more next time round the loop
            record = next(self._records, None) if source is not None else None
            if source is None or record is None:  # every record asked for, or nobody to serve
                self._more = False
                break
            offset, length = record
            for region in source.map.regions:
                page = region.page_size
                lo = max(offset, region.offset)
                hi = min(offset + length, region.offset + region.length)
                if lo < hi:
                    first, last = (lo - region.offset) // page, -(-(hi - region.offset) // page)
                    self.ask(source, region, first, last, demand=False, prefetch=True)
        if self._more or any(f.prefetch for f in self.fetcher.pending):
            return  # more to ask for, or to install, once reads in flight complete
        self._prefetching = False  # every record asked for and in (or all zero)
        self.stats.set(_stats.PREFETCHING, 0)

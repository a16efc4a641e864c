"""The fault handler: an event loop that fills missing pages from a store.

Design note: what the kernel makes a handler do
-----------------------------------------------
- Faults arrive in batches (one read() returns up to ``batch`` messages) and several threads may
  fault on the same page: faults are merged per page, and a fault on a page already filled (a
  window filled it after the fault was queued) is answered with a wake.
- COPY wakes the threads blocked in the range it fills, so the faulting page is copied first and
  the rest of the window after it: the faulting thread resumes as early as possible.
- EEXIST means the page is there already (another fill won): mark it filled, wake, move on.
- EAGAIN means a FORK, REMAP, REMOVE or UNMAP event is queued and unread, and the mapping may
  have changed: read and apply the events, then resume the copy at ``done``. The thread that
  caused such an event sleeps until the event is read, so events are read promptly, always.
- REMOVE (MADV_DONTNEED / MADV_REMOVE) drops pages: they read zeros afterwards, exactly as they
  would without a handler, so they are answered with zero pages from then on. UNMAP forgets a
  range, REMAP moves it, FORK hands over a new uffd for the child's copy of the regions (pages
  filled before the fork are already in the child).
- A range the store cannot read is never zero-filled: the faulting page is poisoned, and the
  access gets SIGBUS.
- A slow store must not stall the program's munmap() or madvise(): while a store read takes
  longer than a couple of milliseconds, a watcher thread reads the uffd (that read is what lets
  the sleeping thread go on) and stashes the batch for the loop, which applies it in order.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import pickle
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

from .._buffer import pinned
from .._core import Userfaultfd
from .._errors import MappingChangedError, PageExistsError, ProcessGoneError, UserfaultfdError
from .._events import Event, Fork, PageFault, Remap, Remove, Unmap
from ..memory import page_size as memory_page_size
from ..stores import Store, StoreError
from . import _stats
from ._policy import Policy
from ._stats import StatsBlock

__all__ = ["Handler", "RegionMap", "RegionState", "read_reports"]

#: How long a store read may keep the handler busy before the watcher reads events for it.
_WATCH_PERIOD = 0.002


@dataclass(slots=True)
class RegionState:
    """One registered range and which of its pages are filled."""

    address: int
    length: int
    #: Byte offset in the store of the range's first byte.
    offset: int
    page_size: int
    stream: int
    filled: bytearray = field(default_factory=bytearray)
    #: Pages dropped by a REMOVE event: served as zeros from then on.
    removed: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if not self.filled:
            self.filled = bytearray(self.pages)
        if not self.removed:
            self.removed = bytearray(self.pages)

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    @property
    def end(self) -> int:
        return self.address + self.length

    def piece(self, start: int, end: int, *, moved_to: int | None = None) -> RegionState:
        """The part [start, end) of this range (optionally moved to a new address)."""
        first, last = (
            (start - self.address) // self.page_size,
            (end - self.address) // self.page_size,
        )
        return RegionState(
            start if moved_to is None else moved_to, end - start,
            self.offset + (start - self.address), self.page_size, self.stream,
            self.filled[first:last], self.removed[first:last],
        )  # fmt: skip


@dataclass(slots=True)
class RegionMap:
    """The registered ranges of one address space, kept up to date by its events."""

    regions: list[RegionState]

    def find(self, address: int) -> RegionState | None:
        for region in self.regions:
            if region.address <= address < region.end:
                return region
        return None

    def cut(self, start: int, end: int) -> list[RegionState]:
        """Split the regions at ``start`` and ``end``; returns the pieces inside [start, end)."""
        kept: list[RegionState] = []
        inside: list[RegionState] = []
        for region in self.regions:
            if region.end <= start or end <= region.address:
                kept.append(region)
                continue
            lo, hi = max(start, region.address), min(end, region.end)
            if region.address < lo:
                kept.append(region.piece(region.address, lo))
            inside.append(region.piece(lo, hi))
            if hi < region.end:
                kept.append(region.piece(hi, region.end))
        self.regions = kept
        return inside

    def change(self, event: Remove | Unmap | Remap) -> None:
        """Follow a REMOVE (the pages read zeros now), UNMAP (forget) or REMAP (move)."""
        if isinstance(event, Unmap):
            self.cut(event.start, event.end)
            return
        if isinstance(event, Remove):
            pieces = self.cut(event.start, event.end)
            for piece in pieces:
                piece.filled[:] = bytes(piece.pages)
                piece.removed[:] = b"\x01" * piece.pages
        else:
            pieces = self.cut(event.old, event.old + event.length)
            for piece in pieces:
                piece.address = event.new + (piece.address - event.old)
        self.regions.extend(pieces)

    def fresh(self) -> list[RegionState]:
        """Copies of the ranges with nothing marked filled (what a restarted handler knows)."""
        copies = []
        for region in self.regions:
            copy = region.piece(region.address, region.end)
            copy.filled = bytearray(copy.pages)
            copies.append(copy)
        return copies


class _Source(RegionMap):
    """One uffd (the owner's, or a forked child's) and the ranges it serves."""

    __slots__ = ("uffd",)

    def __init__(self, uffd: Userfaultfd, regions: list[RegionState]) -> None:
        super().__init__(regions)
        self.uffd = uffd


class Handler:
    """Serves MISSING faults of one or more uffds from ``store``, choosing windows by ``policy``."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        stats: StatsBlock,
        *,
        batch: int = 64,
        buffer_bytes: int = 8 << 20,
        report: int | None = None,
    ) -> None:
        self.store = store
        #: Where REMOVE/UNMAP/REMAP of the first uffd are reported (a pipe to the supervisor).
        self._report = report
        self._primary: _Source | None = None
        self.policy = policy
        self.stats = stats
        self.batch = batch
        self._sources: dict[int, _Source] = {}
        self._deferred: deque[tuple[_Source, int]] = deque()
        self._streams = 0
        self._buffer = mmap.mmap(-1, buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._buffer)
        self._resources = ExitStack()
        self._buffer_address, _ = self._resources.enter_context(pinned(self._buffer))
        self._poller = select.poll()
        # Events the watcher thread read while the handler was busy, in read order.
        self._stash: deque[tuple[_Source, list[Event]]] = deque()
        self._read_lock = threading.Lock()
        self._busy_since = 0.0
        self._stopping = threading.Event()

    # -- sources -----------------------------------------------------------------------------------
    def add(
        self, uffd: Userfaultfd, regions: list[RegionState] | list[tuple[int, int, int, int]]
    ) -> None:
        """Serve ``uffd`` for ``regions``: states, or (address, length, store offset, page size)."""
        states = [r if isinstance(r, RegionState) else RegionState(*r, stream=0) for r in regions]
        for state in states:
            state.stream = self._next_stream()
        self._adopt(uffd, states)

    def _adopt(self, uffd: Userfaultfd, regions: list[RegionState]) -> None:
        source = _Source(uffd, regions)
        self._primary = self._primary or source
        self._sources[uffd.fileno()] = source
        self._poller.register(uffd.fileno(), select.POLLIN)

    def _drop(self, source: _Source) -> None:
        fd = source.uffd.fileno()
        self._poller.unregister(fd)
        del self._sources[fd]
        source.uffd.close()

    def _next_stream(self) -> int:
        self._streams += 1
        return self._streams

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, control: int | None = None) -> None:
        """Serve until ``control`` (a pipe) says b"x" (exit), b"d" (fill everything, then exit)
        or closes, or until every served process is gone."""
        if control is not None:
            self._poller.register(control, select.POLLIN)
        watcher = threading.Thread(target=self._watch, name="uffd-event-watcher", daemon=True)
        watcher.start()
        try:
            while self._sources:
                for fd, _mask in self._poller.poll(1000):
                    if fd == control:  # b"d": fill the rest first; b"x" or EOF: just exit
                        if os.read(control, 1) == b"d":
                            self.drain()
                        return
                    source = self._sources.get(fd)
                    if source is not None:
                        self.pump(source)
        finally:
            self._stopping.set()
            watcher.join()
            self.close()

    def pump(self, source: _Source) -> None:
        """Read one batch of events from ``source`` and answer it (after any batches the
        watcher read meanwhile, which came first)."""
        started = time.perf_counter_ns()
        for owner, events in self._collect(source):
            self._apply(owner, events)
        seen: set[tuple[int, int]] = set()  # threads faulting on one page: answer once
        while self._deferred:
            owner, address = self._deferred.popleft()
            key = (id(owner), address)
            if key in seen or owner.uffd.closed:
                continue
            seen.add(key)
            self._resolve(owner, address)
            self.stats.record_latency(time.perf_counter_ns() - started)

    def _collect(self, source: _Source) -> list[tuple[_Source, list[Event]]]:
        """The watcher's stashed batches, then a fresh one from ``source``, in read order."""
        with self._read_lock:
            batches = list(self._stash)
            self._stash.clear()
            if not source.uffd.closed:
                try:
                    batches.append((source, source.uffd.read_events(self.batch)))
                except ProcessGoneError:
                    self._drop(source)
        return batches

    def _watch(self) -> None:
        """While the handler is busy (a slow store read), read the events it cannot: the
        thread that caused an UNMAP, REMOVE, REMAP or FORK sleeps until its event is read,
        so munmap() or madvise() in the program must not wait for the store."""
        while not self._stopping.wait(_WATCH_PERIOD):
            busy = self._busy_since
            if not busy or time.monotonic() - busy < _WATCH_PERIOD:
                continue
            with self._read_lock:
                for source in list(self._sources.values()):
                    with contextlib.suppress(ProcessGoneError, ValueError):
                        events = source.uffd.read_events(self.batch)
                        if events:
                            self._stash.append((source, events))

    def _apply(self, source: _Source, events: list[Event]) -> None:
        """Apply the non-fault events in order; queue the faults."""
        for event in events:
            if isinstance(event, PageFault):
                self._deferred.append((source, event.address))
                continue
            self.stats.add(_stats.EVENTS)
            if isinstance(event, Fork):
                child = Userfaultfd.from_fd(event.uffd, source.uffd.features)
                copies = [r.piece(r.address, r.end) for r in source.regions]
                for copy in copies:
                    copy.stream = self._next_stream()
                self._adopt(child, copies)
                continue
            source.change(event)
            if self._report is not None and source is self._primary:
                _post(self._report, event)  # the supervisor keeps the map for a restart

    # -- filling pages -----------------------------------------------------------------------------
    def _resolve(self, source: _Source, address: int) -> None:
        region = source.find(address)
        if region is None:  # no map says where this page comes from: SIGBUS beats a hang
            self.stats.add(_stats.ERRORS)
            page = memory_page_size()
            with contextlib.suppress(UserfaultfdError):
                source.uffd.poison(address - address % page, page)
            return
        page = region.page_size
        index = (address - region.address) // page
        self.stats.add(_stats.FAULTS)
        if region.filled[index]:
            self.stats.add(_stats.WAKES)
            source.uffd.wake(region.address + index * page, page)
            return
        if region.removed[index]:
            self._zero(source, region, index)
            return
        start, end = self.policy.window(index, region.pages, page, region.stream)
        start, end = max(start, 0), min(max(end, index + 1), region.pages)
        # The faulting page's run first (it wakes the faulting thread), then the rest.
        run_end = index
        while run_end < end and not region.filled[run_end] and not region.removed[run_end]:
            run_end += 1
        if not self._fill(source, region, index, run_end, fault=index):
            return
        for a, b in _unfilled_runs(region, start, end):
            if not self._fill(source, region, a, b, fault=None):
                return

    def _fill(
        self, source: _Source, region: RegionState, first: int, last: int, fault: int | None
    ) -> bool:
        """Copy pages [first, last) of ``region`` from the store; False if the source is gone."""
        page = region.page_size
        chunk = max(1, len(self._view) // page)
        index = first
        while index < last:
            stop = min(last, index + chunk)
            size = (stop - index) * page
            offset = region.offset + index * page
            self._busy_since = time.monotonic()
            try:
                mapped = self.store.address(offset, size)
                got = (
                    size if mapped is not None else self.store.read_into(offset, self._view[:size])
                )
            except StoreError:
                self.stats.add(_stats.ERRORS)
                if fault is not None and index <= fault < stop:
                    self._poison(source, region, fault)
                return True
            finally:
                self._busy_since = 0.0
            if got < size:  # past the end of the store: the rest of the range is zeros
                self._view[got:size] = bytes(size - got)
            done = self._copy(source, region, index, stop, mapped)
            if done is None:
                return False
            index += max(done, 1)
        return True

    def _copy(
        self,
        source: _Source,
        region: RegionState,
        first: int,
        last: int,
        src: int | None = None,
    ) -> int | None:
        """UFFDIO_COPY pages [first, last) from ``src`` (default: the buffer); returns pages
        handled, or None if the range or its process went away."""
        page = region.page_size
        address = region.address + first * page
        src = self._buffer_address if src is None else src
        # Counted before the ioctl: the copy wakes the faulting thread, which may read the
        # stats at once and must find its page counted.
        self._count_filled(region, first, last)
        try:
            source.uffd.copy(address, src, (last - first) * page)
        except PageExistsError:
            # Some page in the range is there already: go page by page.
            self._count_filled(region, first, last, sign=-1)
            for i in range(first, last):
                try:
                    self._count_filled(region, i, i + 1)
                    offset = (i - first) * page
                    source.uffd.copy(region.address + i * page, src + offset, page)
                except PageExistsError:
                    self._count_filled(region, i, i + 1, sign=-1)
                    region.filled[i] = 1
                    source.uffd.wake(region.address + i * page, page)
            return last - first
        except MappingChangedError as err:
            done = err.done // page
            self._count_filled(region, first + done, last, sign=-1)
            # Apply the queued events; the range may be gone or moved: the fault comes again.
            for owner, events in self._collect(source):
                self._apply(owner, events)
            return done if region in source.regions else None
        except UserfaultfdError as err:
            if err.errno != errno.ENOENT:
                raise
            return None  # the range was unmapped meanwhile: nobody can fault on it any more
        except ProcessGoneError:
            self._drop(source)
            return None
        self.stats.add(_stats.COPIES)
        return last - first

    def _count_filled(self, region: RegionState, first: int, last: int, sign: int = 1) -> None:
        """Mark pages [first, last) filled (``sign`` -1: take that back) and count them."""
        if last <= first:
            return
        region.filled[first:last] = (b"\x01" if sign > 0 else b"\x00") * (last - first)
        self.stats.add(_stats.PAGES, sign * (last - first))
        self.stats.add(_stats.BYTES, sign * (last - first) * region.page_size)

    def _zero(self, source: _Source, region: RegionState, index: int) -> None:
        page = region.page_size
        self._view[:page] = bytes(page)
        self._copy(source, region, index, index + 1)

    def _poison(self, source: _Source, region: RegionState, index: int) -> None:
        page = region.page_size
        try:
            source.uffd.poison(region.address + index * page, page)
        except PageExistsError:
            return
        region.filled[index] = 1
        self.stats.add(_stats.POISONED)

    def drain(self) -> None:
        """Fill every page not filled yet (before the handler goes away)."""
        for source in list(self._sources.values()):
            for region in list(source.regions):
                for a, b in _unfilled_runs(region, 0, region.pages):
                    if not self._fill(source, region, a, b, fault=None):
                        break

    def close(self) -> None:
        for source in list(self._sources.values()):
            self._drop(source)
        self._view.release()
        self._resources.close()


def _post(report: int, event: Event) -> None:
    """One length-prefixed record on the supervisor's pipe (small: written atomically)."""
    record = pickle.dumps(event)
    with contextlib.suppress(BrokenPipeError):
        os.write(report, struct.pack("<I", len(record)) + record)


def read_reports(data: bytearray) -> list[Event]:
    """Take the complete records off the front of ``data`` (what ``_post`` wrote)."""
    events: list[Event] = []
    while len(data) >= 4:
        (size,) = struct.unpack_from("<I", data)
        if len(data) < 4 + size:
            break
        events.append(pickle.loads(bytes(data[4 : 4 + size])))
        del data[: 4 + size]
    return events


def _unfilled_runs(region: RegionState, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of pages in [start, end) neither filled nor removed."""
    index = start
    while index < end:
        if region.filled[index] or region.removed[index]:
            index += 1
            continue
        run = index
        while index < end and not region.filled[index] and not region.removed[index]:
            index += 1
        yield run, index

"""The fault handler: an event loop that fills missing pages from a store.

Design note: the invariant, and what the kernel makes a handler do
------------------------------------------------------------------
- When the last descriptor of a uffd closes, the kernel unregisters its ranges, wakes every
  blocked fault, and from then on zero-fills the missing pages. A zero page looks like data, so
  the runtime keeps one invariant: **a uffd is closed only once every page of its ranges is
  settled (present or poisoned) or removed, or its process is gone.** :meth:`Handler.finish` is
  the one place that closes a source whose process lives, and it settles every page first;
  ``_release`` is reached otherwise only for a source whose process is gone or whose ranges are
  all unmapped. The supervisor holds a descriptor of every uffd too, so a handler that crashes
  closes nothing that matters; when no handler can run, the supervisor settles through a
  Handler of its own (``finish(fill=False)``: poison).
- The handler serves the program and every forked child for as long as each lives, whichever
  exits first. A process is gone when an ioctl on its uffd fails with ESRCH (its address space
  is torn down); the loop probes each source a few times a second with a ZEROPAGE at
  mmap_min_addr, where nothing is registered, which answers ENOENT while the process lives.
- Faults arrive in batches, and several threads may fault on one page: faults are merged per
  page, and a fault on a page already settled is answered with a wake.
- COPY wakes the threads blocked in the range it fills, so the faulting page is copied first and
  the rest of the window after it.
- EEXIST is reported for the first page of a COPY only: that page is there already (another
  fill won); it is settled, woken, and the copy goes on from the next page.
- EAGAIN means a FORK, REMAP, REMOVE or UNMAP event is queued and unread (or a multi-page copy
  stopped at a page already there), with the pages done so far. The fill path only reports
  this (``Outcome.CHANGED``); the loop owns all event reading: it reads and applies every
  pending event, then resolves the fault again from the map as it is now. The thread that
  caused such an event sleeps until the event is read, so events are read promptly, always.
- REMOVE (MADV_DONTNEED / MADV_REMOVE) drops pages: they read zeros afterwards, exactly as they
  would without a handler, so they are answered with zero pages from then on. UNMAP forgets a
  range, REMAP moves it, FORK adopts the child's uffd (and sends it to the supervisor).
- Bytes the store cannot give (an exception, a short read inside the store) are never
  zero-filled: the faulting page is poisoned (SIGBUS), counted and logged. Only the tail of the
  last page past the store's end is zero-padded.
- A slow store must not stall the program's munmap() or madvise(): while a store read takes
  longer than a couple of milliseconds, a watcher thread reads the uffds (that read is what lets
  the sleeping thread go on) and stashes the batches, then wakes the loop through a pipe: a
  stashed fault is answered even though its uffd will not poll readable again.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import mmap
import os
import select
import struct
import threading
import time
from collections import deque
from contextlib import ExitStack

from .._buffer import pinned
from .._core import Userfaultfd
from .._errors import MappingChangedError, PageExistsError, ProcessGoneError, UserfaultfdError
from .._events import Event, Fork, PageFault, Remap, Remove, Unmap
from .._forked import Channel
from ..stores import Store
from . import _stats
from ._fetch import Fetch, Fetcher, read_range
from ._policy import Policy
from ._ranges import RegionMap, RegionState, unsettled_runs
from ._reports import Adopted, Changed, Closed, Reporter, pack_ranges
from ._stats import StatsBlock

__all__ = ["Handler"]

_log = logging.getLogger("userfaultfd.runtime")

#: How long a store read may keep the handler busy before the watcher reads events for it.
_WATCH_PERIOD = 0.002
#: The largest read handed to one fetch thread (a window is split into reads this size).
_FETCH_UNIT = 2 << 20
#: A working-set record: each fill a fault caused, as (store offset, length), in order.
_RECORD = struct.Struct("<QQ")
#: A store read that fails faster than this may be tried again on a smaller range.
_QUICK_FAILURE = 0.1
#: How often every source is probed for a process that is gone.
_PROBE_PERIOD = 0.25


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


def _probe_address() -> int:
    """The lowest address userspace may map: nothing a handler serves is ever registered there."""
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            lowest = int(f.read())
    except OSError:
        lowest = 65536
    page = mmap.PAGESIZE
    return max(page, -(-lowest // page) * page)


class Outcome(enum.Enum):
    """What an attempt to settle pages came to."""

    DONE = enum.auto()  #: the pages are settled (or the store failed for pages nobody waits on)
    CHANGED = enum.auto()  #: EAGAIN: read the pending events, then try again
    PROCESS_GONE = enum.auto()  #: ESRCH: the source was released
    STORE_FAILED = enum.auto()  #: the source bytes could not be read (a mapped store shrank)


class _Fill(enum.Enum):
    COPY = enum.auto()
    ZERO = enum.auto()
    POISON = enum.auto()


class _Source(RegionMap):
    """One uffd (the program's, or a forked child's), its key, and the ranges it serves."""

    __slots__ = ("key", "uffd")

    def __init__(self, key: int, uffd: Userfaultfd, regions: list[RegionState]) -> None:
        super().__init__(regions)
        self.key = key
        self.uffd = uffd


class Handler:
    """Serves MISSING faults of one or more uffds from ``store``, choosing windows by ``policy``.

    ``store`` None: a handler that can only poison (the supervisor's, when no handler can run).
    ``reports``: the channel to a supervisor, which is told every change it needs for a restart.
    """

    def __init__(
        self,
        store: Store | None,
        policy: Policy,
        stats: StatsBlock,
        *,
        batch: int = 64,
        buffer_bytes: int = 8 << 20,
        reports: Channel | None = None,
        first_key: int = 1,
        fetches: int | None = None,
        record: str | None = None,
        prefetch: str | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.stats = stats
        self.batch = batch
        self._reports = Reporter(reports)
        self._next_key = first_key
        self._sources: dict[int, _Source] = {}
        # A FORK event's uffd -> the key it was reported as, and the child's ranges at the fork.
        self._fork_keys: dict[int, tuple[int, list[RegionState]]] = {}
        self._by_key: dict[int, _Source] = {}
        self._faults: deque[tuple[_Source, int]] = deque()
        self._streams = 0
        self._buffer = mmap.mmap(-1, buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._buffer)
        self._resources = ExitStack()
        self._buffer_address, _ = self._resources.enter_context(pinned(self._buffer))
        self._probe_at = _probe_address()
        self._zero_map: mmap.mmap | None = None
        self._zero_address = 0
        self._poller = select.poll()
        # Batches the watcher read while the loop was busy, in read order; the pipe wakes the loop.
        self._stash: deque[tuple[_Source, list[Event]]] = deque()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller.register(self._wake_read, select.POLLIN)
        self._read_lock = threading.Lock()
        # Many reads in flight, for a store that serves them concurrently (see _fetch).
        depth = fetches if fetches is not None else (store.parallel_reads if store else 1)
        if prefetch is not None:
            depth = max(depth, 2)  # a prefetch reads behind the faults, never in their way
        self._fetcher = (
            Fetcher(store, depth, max(_FETCH_UNIT, buffer_bytes // depth), self._wake_write)
            if store is not None and depth > 1 else None
        )  # fmt: skip
        self._retry: deque[Fetch] = deque()  # fetches whose install met EAGAIN
        self._held: dict[tuple[int, int], bytes] = {}  # marker pages kept back, by store offset
        self._record = open(record, "ab") if record is not None else None  # noqa: SIM115
        self._prefetch = prefetch
        self._prefetching = False
        # Only a store that overrides known_zero is asked page by page.
        self._background = False  # b"b": fill every page between faults
        self._cursors: dict[tuple[int, int], int] = {}  # where the background fill got to
        self._knows_zeros = store is not None and type(store).known_zero is not Store.known_zero
        self._busy_since = 0.0
        self._failed_quickly = True
        self._stopping = threading.Event()

    # -- sources -----------------------------------------------------------------------------------
    def add(
        self,
        uffd: Userfaultfd,
        regions: list[RegionState] | list[tuple[int, int, int, int]],
        *,
        key: int | None = None,
    ) -> int:
        """Serve ``uffd`` for ``regions``: states, or (address, length, store offset, page size).
        Returns the source's key."""
        states = [r if isinstance(r, RegionState) else RegionState(*r) for r in regions]
        for state in states:
            state.stream = self._next_stream()
        if key is None:
            key = self._next_key
        self._next_key = max(self._next_key, key + 1)
        source = _Source(key, uffd, states)
        self._sources[uffd.fileno()] = source
        self._by_key[key] = source
        self._poller.register(uffd.fileno(), select.POLLIN)
        return key

    def _release(self, source: _Source) -> None:
        """Close a source. Only for one that is settled, or whose process or ranges are gone."""
        with self._read_lock:
            fd = source.uffd.fileno()
            self._poller.unregister(fd)
            del self._sources[fd]
            self._by_key.pop(source.key, None)
            source.uffd.close()
        self._reports.send(Closed(source.key))

    def _next_stream(self) -> int:
        self._streams += 1
        return self._streams

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, commands: int | None = None, control: int | None = None) -> None:
        """Serve until every served process is gone or has unmapped its ranges, or until a
        command: b"d" fills every page not filled yet, b"p" poisons them, then the handler exits;
        b"b" fills them in the background, between faults, and exits when all are in.

        ``commands`` comes from the supervisor. When it closes (the supervisor died), the
        handler goes on alone and takes its commands from the program's ``control`` pipe."""
        listening = commands if commands is not None else control
        if listening is not None:
            self._poller.register(listening, select.POLLIN)
        watcher = threading.Thread(target=self._watch, name="uffd-event-watcher", daemon=True)
        watcher.start()
        self.start_prefetch()
        try:
            probed = time.monotonic()
            while self._sources:
                if self._background and not self._background_step():
                    self.finish(fill=True)  # every page is in
                    return
                idle = 0 if self._background else _PROBE_PERIOD * 1000
                for fd, _mask in self._poller.poll(idle):
                    if fd == self._wake_read:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                        self._serve(None)
                    elif fd == listening:
                        command = os.read(fd, 1)
                        if command in (b"d", b"p"):
                            self.finish(fill=command == b"d")
                            return
                        if command == b"b":
                            self._background = True
                            continue
                        self._poller.unregister(fd)  # EOF
                        listening = None
                        if fd == commands:  # the supervisor is gone: go on alone
                            self._reports.orphaned()
                            if control is not None:
                                self._poller.register(control, select.POLLIN)
                                listening = control
                    elif (source := self._sources.get(fd)) is not None:
                        self._serve(source)
                if time.monotonic() - probed >= _PROBE_PERIOD:
                    if self._record is not None:
                        self._record.flush()
                    self._probe()
                    probed = time.monotonic()
        except BaseException:
            if not self._reports.supervised:  # nobody else holds the uffds: settle them here
                _log.exception("the fault handler failed; poisoning every page not filled")
                self.finish(fill=False)
            raise
        finally:
            self._stopping.set()
            watcher.join()
            self.close()

    def _serve(self, source: _Source | None) -> None:
        """Answer what is pending: the watcher's batches, a batch from ``source``, their faults."""
        started = time.perf_counter_ns()
        self._apply_all(self._collect([source] if source is not None else []))
        answered: set[tuple[int, int]] = set()  # threads faulting on one page: answer once
        while self._faults:
            owner, address = self._faults.popleft()
            if owner.uffd.closed or (owner.key, address) in answered:
                continue
            outcome = self._resolve(owner, address)
            if outcome is Outcome.CHANGED:
                self._catch_up()
                self._faults.appendleft((owner, address))  # resolve it again, from the new map
                continue
            answered.add((owner.key, address))
            if self._fetcher is None:
                self.stats.record_latency(time.perf_counter_ns() - started)
            if self._stash:
                self._apply_all(self._collect([]))
        if self._fetcher is not None:
            self._install_completed()

    def _collect(self, sources: list[_Source]) -> list[tuple[_Source, list[Event]]]:
        """The watcher's stashed batches, then one fresh batch from each of ``sources``."""
        with self._read_lock:
            batches = list(self._stash)
            self._stash.clear()
            for source in sources:
                if not source.uffd.closed:
                    events = source.uffd.read_events(self.batch)
                    if events:
                        earlier = [batch for owner, batch in batches if owner is source]
                        self._forward_forks(source, events, earlier)
                        batches.append((source, events))
        return batches

    def _forward_forks(
        self, source: _Source, events: list[Event], earlier: list[list[Event]]
    ) -> None:
        """For each FORK event, the moment it is read: the child's ranges as they were at the
        fork, and its uffd sent to the supervisor (until then this process holds the child's
        only descriptor, and dying would close it).

        The child is a copy of the parent at the fork, which the reading of the event ends: no
        COPY into the parent can land in between (the kernel answers EAGAIN while a FORK event
        is unread). So the child's map is the parent's as it is now, with the events read
        before the FORK but not applied yet (``earlier`` batches, and this one's) applied."""
        if not any(isinstance(event, Fork) for event in events):
            return
        at_fork = RegionMap([r.piece(r.address, r.end) for r in source.regions])
        for event in [e for batch in earlier for e in batch if not isinstance(e, Fork)] + events:
            if isinstance(event, Remove | Unmap | Remap):
                at_fork.change(event)
            elif isinstance(event, Fork):
                key = self._next_key
                self._next_key += 1
                copies = [r.piece(r.address, r.end) for r in at_fork.regions]
                self._fork_keys[event.uffd] = (key, copies)
                self._reports.send(Adopted(source.key, key, pack_ranges(copies)), [event.uffd])

    def _catch_up(self) -> None:
        """Read and apply every pending event of every source (after an EAGAIN)."""
        read = False
        while batches := self._collect(list(self._sources.values())):
            self._apply_all(batches)
            read = True
        if not read:
            # EAGAIN with nothing to read: the event was read, but the thread that caused it has
            # not yet marked the mapping stable again. It does so within microseconds.
            time.sleep(50e-6)

    def _watch(self) -> None:
        """While the loop is busy (a slow store read), read the events it cannot."""
        while not self._stopping.wait(_WATCH_PERIOD):
            busy = self._busy_since
            if not busy or time.monotonic() - busy < _WATCH_PERIOD:
                continue
            with self._read_lock:
                stashed = False
                for source in list(self._sources.values()):
                    with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                        events = source.uffd.read_events(self.batch)
                        if events:
                            earlier = [batch for owner, batch in self._stash if owner is source]
                            self._forward_forks(source, events, earlier)
                            self._stash.append((source, events))
                            stashed = True
                if stashed:
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._wake_write, b"\0")

    def _apply_all(self, batches: list[tuple[_Source, list[Event]]]) -> None:
        for source, events in batches:
            for event in events:
                if not source.uffd.closed:
                    self._apply(source, event)

    def _apply(self, source: _Source, event: Event) -> None:
        """Queue a fault; apply any other event to the map at once (and tell the supervisor)."""
        if isinstance(event, PageFault):
            self._faults.append((source, event.address))
            return
        self.stats.add(_stats.EVENTS)
        if isinstance(event, Fork):
            child = Userfaultfd.from_fd(event.uffd, source.uffd.features)
            key, copies = self._fork_keys.pop(event.uffd)
            self.add(child, copies, key=key)
            return
        if isinstance(event, Remove | Unmap | Remap):
            source.change(event)
            self._reports.send(Changed(source.key, event))
            if not source.regions:  # every range unmapped: nothing left to serve there
                self._release(source)

    def _probe(self) -> None:
        """Release the sources whose process is gone."""
        for source in list(self._sources.values()):
            try:
                source.uffd.zeropage(self._probe_at, mmap.PAGESIZE)
            except ProcessGoneError:
                self._release(source)
            except UserfaultfdError:
                pass  # ENOENT (or EAGAIN): the process is there
            else:
                _log.error("the liveness probe at 0x%x mapped a zero page", self._probe_at)

    # -- settling pages ----------------------------------------------------------------------------
    def finish(self, *, fill: bool) -> None:
        """Settle every page of every source, then close them: the only way a source whose
        process lives is closed. ``fill``: from the store, poisoning what it cannot give;
        otherwise poison every page not filled yet."""
        if fill and self._fetcher is not None:
            self._drain_in_flight()
        while self._sources:
            self._catch_up()  # events first: a FORK adds a source, a REMAP moves a range
            self._faults.clear()  # settling wakes every fault there is
            source = next(iter(self._sources.values()), None)
            if source is None:
                break
            outcome = self._settle(source, fill=fill and self.store is not None)
            if outcome is Outcome.DONE:
                self._release(source)
        self.close()

    def _settle(self, source: _Source, *, fill: bool) -> Outcome:
        for region in list(source.regions):
            for first, last in list(unsettled_runs(region, 0, region.pages)):
                if fill:
                    outcome = self._fill(source, region, first, last, must=(first, last))
                else:
                    outcome = self._place(source, region, first, last, _Fill.POISON)
                if outcome is not Outcome.DONE:
                    return outcome
        return Outcome.DONE

    def close(self) -> None:
        """Release the buffer. Sources still open are left to whoever holds their copies."""
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None
        if self._record is not None:
            self._record.close()
            self._record = None
        if not self._buffer.closed:
            self._view.release()
            self._resources.close()
            self._buffer.close()
            if self._zero_map is not None:
                self._zero_map.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    # -- many reads in flight (see _fetch) ------------------------------------------------------
    def _request(
        self, source: _Source, region: RegionState, index: int, start: int, end: int
    ) -> Outcome:
        """Ask for the faulting page's bytes first, then the rest of the window and, for a
        sequential stream, the window after it; the fault is answered when its bytes arrive."""
        assert self._fetcher is not None
        page = region.page_size
        offset = region.offset + index * page
        held = self._held.pop((source.key, offset), None)
        if held is not None:  # a marker page: its bytes are here already
            self._view[:page] = held
            outcome = self._place(source, region, index, index + 1, _Fill.COPY,
                                  self._buffer_address)  # fmt: skip
            if outcome is not Outcome.DONE:
                return outcome
        else:
            fetch = self._fetcher.covering(source.key, offset)
            if fetch is not None:
                fetch.waiters.append((source.key, region.at(index), time.perf_counter_ns()))
                self._fetcher.promote(fetch)
            else:
                waiter = (source.key, region.at(index), time.perf_counter_ns())
                self._ask(source, region, index, end, demand=True, waiter=waiter)
        self._ask(source, region, start, end, demand=False)
        ahead = self.policy.readahead(index, start, end, region.pages, page, region.stream)
        if ahead is not None and ahead[0] < ahead[1]:
            first, last = ahead[0], min(ahead[1], region.pages)
            self._ask(source, region, first, last, demand=False,
                      marker=self._marker(source, region, first, last))  # fmt: skip
        return Outcome.DONE

    def _marker(self, source: _Source, region: RegionState, first: int, last: int) -> int:
        """The store offset of the first page of the read-ahead [first, last) that is not in
        yet, where the program's fault will ask for the next window (-1: none is left). A
        read already in flight there carries it; otherwise the read _ask submits does."""
        assert self._fetcher is not None
        run = next(unsettled_runs(region, first, last), None)
        if run is None:
            return -1
        offset = region.offset + run[0] * region.page_size
        covering = self._fetcher.covering(source.key, offset)
        if covering is not None and covering.marker < 0:
            covering.marker = offset
        return offset

    def _ask(
        self, source: _Source, region: RegionState, first: int, last: int, *, demand: bool,
        waiter: tuple[int, int, int] | None = None, marker: int = -1, prefetch: bool = False,
    ) -> None:  # fmt: skip
        """Submit reads for the pages of [first, last) that are neither settled nor being read,
        split at the fetch unit. With ``demand``, only the run that starts at ``first``."""
        assert self._fetcher is not None and self.store is not None
        page = region.page_size
        unit_pages = max(1, self._fetcher.unit // page)
        for a, b in list(unsettled_runs(region, first, last)):
            index = a
            while index < b:
                offset = region.offset + index * page
                covering = self._fetcher.covering(source.key, offset)
                if covering is not None:
                    index = max(index + 1, -(-(covering.end - region.offset) // page))
                    continue
                stop, zero = self._run_of_kind(region, index, min(b, index + unit_pages))
                size = (stop - index) * page
                if zero:
                    self._place(source, region, index, stop, _Fill.ZERO)
                    self.stats.add(_stats.ZEROS, stop - index)
                else:
                    fetch = Fetch(source.key, offset, size, demand, prefetch=prefetch,
                                  marker=marker if index * page + region.offset <= marker
                                  < offset + size else -1)  # fmt: skip
                    if waiter is not None:
                        fetch.waiters.append(waiter)
                    self._fetcher.submit(fetch)
                if demand:
                    return
                index = stop
            if demand:
                return

    def _install_completed(self) -> None:
        """Place the bytes of every read that has arrived."""
        assert self._fetcher is not None
        while done := [*self._retry, *self._fetcher.completed()]:
            self._retry.clear()
            for position, fetch in enumerate(done):
                outcome = self._install(fetch)
                if outcome is Outcome.CHANGED:
                    self._catch_up()
                    self._retry.extend(done[position:])
                    break
                self._fetcher.release(fetch)
        if self._prefetching and not any(f.prefetch for f in self._fetcher.pending):
            self._prefetching = False
            self.stats.set(_stats.PREFETCHING, 0)

    def _install(self, fetch: Fetch) -> Outcome:
        source = self._by_key.get(fetch.key)
        if source is None or source.uffd.closed:
            return Outcome.DONE
        if fetch.error is not None:
            return self._fetch_failed(source, fetch)
        waited = {address for _key, address, _t in fetch.waiters}
        for region in list(source.regions):
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
                    outcome = self._place(source, region, c, d, _Fill.COPY, src,
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

    def _fetch_failed(self, source: _Source, fetch: Fetch) -> Outcome:
        """The store could not give ``fetch``'s bytes: each page a thread waits on is asked for
        alone (if the store failed quickly), or poisoned."""
        assert self._fetcher is not None
        self._fetcher.release(fetch)  # no longer in flight: its pages may be asked for again
        self.stats.add(_stats.ERRORS)
        _log.warning("store %r failed at offset %d (%d bytes): %s: %s; pages that are waited "
                     "on are poisoned", self.store, fetch.offset, fetch.size,
                     type(fetch.error).__name__, fetch.error)  # fmt: skip
        for _key, address, asked in fetch.waiters:
            region = source.find(address)
            if region is None:
                continue
            index = (address - region.address) // region.page_size
            if region.settled[index]:
                continue
            if fetch.size > region.page_size and fetch.failed_quickly:
                self._ask(source, region, index, index + 1, demand=True,
                          waiter=(fetch.key, address, asked))  # fmt: skip
                continue
            outcome = self._place(source, region, index, index + 1, _Fill.POISON)
            if outcome is not Outcome.DONE:
                return outcome
        if self._background:  # the fill must end: what the store cannot give is poisoned
            for region in list(source.regions):
                page = region.page_size
                lo = max(fetch.offset, region.offset)
                hi = min(fetch.end, region.offset + region.length)
                if lo < hi:
                    first, last = (lo - region.offset) // page, -(-(hi - region.offset) // page)
                    for a, b in list(unsettled_runs(region, first, last)):
                        outcome = self._place(source, region, a, b, _Fill.POISON)
                        if outcome is not Outcome.DONE:
                            return outcome
        return Outcome.DONE

    def _background_step(self) -> bool:
        """Fill the next run of pages not filled yet, answering faults first (the loop polls
        between steps); False once every page is in."""
        for source in list(self._sources.values()):
            for region in list(source.regions):
                cursor = (source.key, region.offset)
                start = self._cursors.get(cursor, 0)
                for first, last in unsettled_runs(region, start, region.pages):
                    page = region.page_size
                    if self._fetcher is None:
                        last = min(last, first + max(1, len(self._view) // page))
                        outcome = self._fill(source, region, first, last, must=(first, last))
                        if outcome is Outcome.CHANGED:
                            self._catch_up()
                        return True
                    if len(self._fetcher.pending) >= self._fetcher.workers:
                        return True  # enough in flight: wait for them
                    covering = self._fetcher.covering(source.key, region.offset + first * page)
                    if covering is None:
                        last = min(last, first + max(1, self._fetcher.unit // page))
                        self._ask(source, region, first, last, demand=False)
                    else:
                        last = -(-(covering.end - region.offset) // page)
                    self._cursors[cursor] = last
                    return True
                self._cursors[cursor] = region.pages
        if self._fetcher is not None and self._fetcher.pending:
            return True
        regions = [r for source in self._sources.values() for r in source.regions]
        if any(next(unsettled_runs(r, 0, r.pages), None) for r in regions):
            self._cursors.clear()  # pages the store failed on, or ranges that moved: go again
            return True
        return False

    def _drain_in_flight(self) -> None:
        """Fill every page not filled yet with many reads in flight (before finish's own pass,
        which then only settles what this could not: pages the store failed on)."""
        assert self._fetcher is not None
        for source in list(self._sources.values()):
            for region in list(source.regions):
                self._ask(source, region, 0, region.pages, demand=False)
        while self._fetcher.pending and self._sources:
            ready = select.select([self._wake_read], [], [], 0.05)[0]
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
            self._apply_all(self._collect(list(self._sources.values())))
            self._faults.clear()  # the drain fills every page: it wakes every fault there is
            self._install_completed()

    def start_prefetch(self) -> None:
        """Ask for a recorded working set, in its order, behind any demand read. The stats
        say when it is all in (``PREFETCHING`` back to 0: serve() waits for it)."""
        if self._prefetch is None or self._fetcher is None:
            return
        source = self._by_key.get(1)
        try:
            with open(self._prefetch, "rb") as f:
                data = f.read()
        except OSError as err:
            _log.warning("prefetch: cannot read %s: %s", self._prefetch, err)
            data = b""
        if source is None or not data:
            self.stats.set(_stats.PREFETCHING, 0)
            return
        self._prefetching = True
        for offset, length in _RECORD.iter_unpack(data[: len(data) // _RECORD.size * _RECORD.size]):
            for region in source.regions:
                page = region.page_size
                lo = max(offset, region.offset)
                hi = min(offset + length, region.offset + region.length)
                if lo < hi:
                    first, last = (lo - region.offset) // page, -(-(hi - region.offset) // page)
                    self._ask(source, region, first, last, demand=False, prefetch=True)
        if not any(f.prefetch for f in self._fetcher.pending):  # all there, or all zero
            self._prefetching = False
            self.stats.set(_stats.PREFETCHING, 0)

    # -- filling pages -----------------------------------------------------------------------------
    def _zeros(self, length: int) -> int:
        """The address of ``length`` zero bytes (a mapping never written)."""
        if self._zero_map is None or len(self._zero_map) < length:
            self._zero_map = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                       prot=mmap.PROT_READ)  # fmt: skip
            self._zero_address, _ = self._resources.enter_context(pinned(self._zero_map))
        return self._zero_address

    def _resolve(self, source: _Source, address: int) -> Outcome:
        region = source.find(address)
        page = mmap.PAGESIZE if region is None else region.page_size
        if region is None:  # no map says where this page comes from: SIGBUS beats a hang
            self.stats.add(_stats.ERRORS)
            with contextlib.suppress(UserfaultfdError):
                source.uffd.poison(address - address % page, page)
            return Outcome.DONE
        index = (address - region.address) // page
        self.stats.add(_stats.FAULTS)
        if region.settled[index]:
            self.stats.add(_stats.WAKES)
            source.uffd.wake(region.at(index), page)
            return Outcome.DONE
        if region.removed[index]:
            return self._place(source, region, index, index + 1, _Fill.ZERO)
        if self._fetcher is not None:
            offset = region.offset + index * page
            fetch = self._fetcher.covering(source.key, offset)
            if fetch is not None and fetch.marker != offset:
                # Its bytes are on the way: wait for them. The policy is not asked, since this
                # is no new access, only the program catching up with the read-ahead.
                fetch.waiters.append((source.key, region.at(index), time.perf_counter_ns()))
                self._fetcher.promote(fetch)
                return Outcome.DONE
        start, end = self.policy.window(index, region.pages, page, region.stream)
        start, end = max(start, 0), min(max(end, index + 1), region.pages)
        if self._record is not None and source.key == 1:
            self._record.write(_RECORD.pack(region.offset + start * page, (end - start) * page))
        if self._fetcher is not None:
            return self._request(source, region, index, start, end)
        # The faulting page's run first (it wakes the faulting thread), then the rest.
        run_end = index
        while run_end < end and not region.settled[run_end] and not region.removed[run_end]:
            run_end += 1
        outcome = self._fill(source, region, index, run_end, must=(index, index + 1))
        for first, last in list(unsettled_runs(region, start, end)):
            if outcome is not Outcome.DONE:
                break
            outcome = self._fill(source, region, first, last, must=(0, 0))
        return outcome

    def _fill(
        self, source: _Source, region: RegionState, first: int, last: int, must: tuple[int, int]
    ) -> Outcome:
        """Copy pages [first, last) of ``region`` from the store. Pages in ``must`` that the
        store cannot give are poisoned; others are left for a later fault to try again."""
        assert self.store is not None
        page = region.page_size
        chunk = max(1, len(self._view) // page)
        index = first
        while index < last:
            stop, zero = self._run_of_kind(region, index, min(last, index + chunk))
            offset, size = region.offset + index * page, (stop - index) * page
            if zero:
                outcome = self._place(source, region, index, stop, _Fill.ZERO)
                if outcome is not Outcome.DONE:
                    return outcome
                self.stats.add(_stats.ZEROS, stop - index)
                index = stop
                continue
            src = self._read(offset, size)
            outcome = Outcome.STORE_FAILED
            if src is not None:
                outcome = self._place(source, region, index, stop, _Fill.COPY, src)
            if outcome is Outcome.STORE_FAILED:
                lo, hi = max(index, must[0]), min(stop, must[1])
                outcome = Outcome.DONE
                if lo < hi:
                    tried = (index, stop) if self._failed_quickly else (lo, hi)
                    outcome = self._fill_or_poison(source, region, lo, hi, tried)
            if outcome is not Outcome.DONE:
                return outcome
            index = stop
        return Outcome.DONE

    def _run_of_kind(self, region: RegionState, first: int, last: int) -> tuple[int, bool]:
        """The longest run [first, end) of pages in [first, last) that the store knows are all
        zero, or that it does not: (end, whether they are zero)."""
        assert self.store is not None
        page = region.page_size
        if not self._knows_zeros:
            return last, False
        if self.store.known_zero(region.offset + first * page, (last - first) * page):
            return last, True
        zero = self.store.known_zero(region.offset + first * page, page)
        end = first + 1
        while end < last and self.store.known_zero(region.offset + end * page, page) == zero:
            end += 1
        return end, zero

    def _fill_or_poison(
        self, source: _Source, region: RegionState, first: int, last: int, tried: tuple[int, int]
    ) -> Outcome:
        """After the store failed for pages ``tried``, fill [first, last) in halves, down to
        single pages, and poison only the pages it cannot give: a bad chunk of a pack read
        ahead must not cost the faulting page that lies outside it. A store that fails slowly
        (a timeout: the network is down) is not asked again: everything left is poisoned."""
        if tried == (first, last):
            if last - first == 1 or not self._failed_quickly:
                return self._place(source, region, first, last, _Fill.POISON)
            middle = (first + last) // 2
            outcome = self._fill_or_poison(source, region, first, middle, (first, middle))
            if outcome is Outcome.DONE:
                outcome = self._fill_or_poison(source, region, middle, last, (middle, last))
            return outcome
        page = region.page_size
        src = self._read(region.offset + first * page, (last - first) * page)
        outcome = Outcome.STORE_FAILED
        if src is not None:
            outcome = self._place(source, region, first, last, _Fill.COPY, src)
        if outcome is Outcome.STORE_FAILED:
            return self._fill_or_poison(source, region, first, last, (first, last))
        return outcome

    def _read(self, offset: int, size: int) -> int | None:
        """The address of store bytes [offset, offset + size), or None if the store failed."""
        assert self.store is not None
        self._busy_since = time.monotonic()
        try:
            mapped = self.store.address(offset, size)
            if mapped is not None:
                return mapped
            read_range(self.store, offset, self._view[:size])
            return self._buffer_address
        except Exception as err:  # any failure of the store is a page it cannot give
            self._failed_quickly = time.monotonic() - self._busy_since < _QUICK_FAILURE
            self.stats.add(_stats.ERRORS)
            _log.warning("store %r failed at offset %d (%d bytes): %s: %s; pages that are "
                         "waited on are poisoned", self.store, offset, size,
                         type(err).__name__, err)  # fmt: skip
            return None
        finally:
            self._busy_since = 0.0

    def _place(
        self, source: _Source, region: RegionState, first: int, last: int, how: _Fill,
        src: int = 0, *, wake: bool = True,
    ) -> Outcome:  # fmt: skip
        """Settle pages [first, last) by one ioctl (COPY from ``src``, ZEROPAGE or POISON),
        going on past pages that are there already."""
        page = region.page_size
        while first < last:
            address, length = region.at(first), (last - first) * page
            # Counted before the ioctl: it wakes the faulting thread, which may read the stats
            # at once and must find its page counted.
            self._count(region, first, last, how)
            try:
                if how is _Fill.COPY:
                    source.uffd.copy(address, src, length, wake=wake)
                elif how is _Fill.ZERO:  # a COPY of zeros: hugetlbfs ranges have no ZEROPAGE
                    source.uffd.copy(address, self._zeros(length), length)
                else:
                    source.uffd.poison(address, length)
            except PageExistsError:  # the first page is there already
                self._count(region, first, last, how, sign=-1)
                region.settled[first] = 1
                self.stats.add(_stats.WAKES)
                source.uffd.wake(address, page)
                first, src = first + 1, src + page
                continue
            except MappingChangedError as err:
                done = err.done // page
                self._count(region, first + done, last, how, sign=-1)
                region.settled[first : first + done] = b"\x01" * done
                return Outcome.CHANGED
            except ProcessGoneError:
                self._count(region, first, last, how, sign=-1)
                self._release(source)
                return Outcome.PROCESS_GONE
            except UserfaultfdError as err:
                self._count(region, first, last, how, sign=-1)
                if err.errno == errno.ENOENT:
                    # Unmapped meanwhile (its UNMAP event follows): nothing there to settle.
                    region.settled[first:last] = b"\x01" * (last - first)
                    return Outcome.DONE
                if err.errno == errno.EFAULT and how is _Fill.COPY:
                    self.stats.add(_stats.ERRORS)
                    _log.warning("store %r: its mapped bytes for 0x%x+%d cannot be read (the "
                                 "file shrank?)", self.store, address, length)  # fmt: skip
                    return Outcome.STORE_FAILED
                raise
            region.settled[first:last] = b"\x01" * (last - first)
            if how is _Fill.COPY:
                self.stats.add(_stats.COPIES)
            return Outcome.DONE
        return Outcome.DONE

    def _count(self, region: RegionState, first: int, last: int, how: _Fill, sign: int = 1) -> None:
        pages = sign * max(0, last - first)
        if how is _Fill.POISON:
            self.stats.add(_stats.POISONED, pages)
        elif how is _Fill.COPY:
            self.stats.add(_stats.PAGES, pages)
            self.stats.add(_stats.BYTES, pages * region.page_size)

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
- The handler is a composition: this loop owns the sources, all event reading and every
  decision; it holds a :class:`~._fill.Filler` (the ioctls and the buffer: what COPY, EEXIST,
  EAGAIN and ESRCH mean), a :class:`~._inflight.Reads` when reads are kept in flight, and an
  answerer (``_answer``) that reads a batch of events and answers the faults it can from bytes
  at hand (the native fast path, or nothing: then this loop resolves each fault). The parts
  answer with an :class:`~._fill.Outcome` and never call back: after an EAGAIN
  (``Outcome.CHANGED``) this loop reads and applies every pending event, then resolves the fault
  again from the map as it is now; a source whose process is gone (``Filler.gone``) is released
  here. The thread that caused such an event sleeps until the event
  is read, so events are read promptly, always.
- REMOVE (MADV_DONTNEED / MADV_REMOVE) drops pages: they read zeros afterwards, exactly as they
  would without a handler, so they are answered with zero pages from then on. UNMAP forgets a
  range, REMAP moves it, FORK adopts the child's uffd (and sends it to the supervisor).
- A slow store must not stall the program's munmap() or madvise(): while a store read takes
  longer than a couple of milliseconds, a watcher thread reads the uffds (that read is what lets
  the sleeping thread go on) and stashes the batches, then wakes the loop through a pipe: a
  stashed fault is answered even though its uffd will not poll readable again.
- Whoever reads events (the loop, the watcher or the native answerer) reads them into the
  supervisor's journal and reports every change to the supervisor at once, before anything is
  served from the map: a handler killed at any point after a read (in a slow store read with
  the batch still stashed, or between the read and the report) is restarted from a map that has
  it (see _journal; a FORK's new descriptor is the one thing a death in that window loses).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import threading
import time
from collections import deque
from typing import final

from .._core import Userfaultfd
from .._errors import ProcessGoneError, UserfaultfdError
from .._events import Event, Fork, PageFault, Remap, Remove, Unmap
from .._flags import FaultFlag
from .._forked import Channel
from .._ready import readable
from ..stores import Store
from . import _stats
from ._answer import NATIVE, Answerer, answerer_for
from ._export import ENDED, MapExport
from ._fetch import Fetcher
from ._fill import PROGRAM, Fill, Filler, Outcome, Source
from ._inflight import RECORD, Reads
from ._journal import MAX_BATCH, Journal
from ._pager import Pager, PagerSetup
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
#: How often every source is probed for a process that is gone.
_PROBE_PERIOD = 0.25


def _probe_address() -> int:
    """The lowest address userspace may map: nothing a handler serves is ever registered there."""
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            lowest = int(f.read())
    except OSError:
        lowest = 65536
    page = mmap.PAGESIZE
    return max(page, -(-lowest // page) * page)


@final
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
        first_key: int = PROGRAM,
        fetches: int | None = None,
        record: str | None = None,
        prefetch: str | None = None,
        journal: Journal | None = None,
        export: MapExport | None = None,
        pager: PagerSetup | None = None,
        pager_store: Store | None = None,
    ) -> None:
        self.store = store
        self.stats = stats
        self.policy = policy
        self._filler = Filler(store, stats, buffer_bytes)
        self.batch = min(batch, MAX_BATCH)  # what one read into the journal (and C) holds
        self._reports = Reporter(reports)
        self._next_key = first_key
        self._sources: dict[int, Source] = {}
        # A FORK event's uffd -> the key it was reported as, and the child's ranges at the fork.
        self._fork_keys: dict[int, tuple[int, list[RegionState]]] = {}
        self._by_key: dict[int, Source] = {}
        self._faults: deque[tuple[Source, int]] = deque()
        self._streams = 0
        self._probe_at = _probe_address()
        # Batches the watcher read while the loop was busy, in read order; the pipe wakes the loop.
        self._stash: deque[tuple[Source, list[Event]]] = deque()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._read_lock = threading.Lock()
        # Many reads in flight, for a store that serves them concurrently (see _fetch).
        depth = fetches if fetches is not None else (store.parallel_reads if store else 1)
        if prefetch is not None:
            depth = max(depth, 2)  # a prefetch reads behind the faults, never in their way
        self._reads = (
            Reads(Fetcher(store, depth, max(_FETCH_UNIT, buffer_bytes // depth), self._wake_write),
                  self._filler, policy, stats, self._by_key, prefetch)
            if store is not None and depth > 1 else None
        )  # fmt: skip
        self._record = open(record, "ab") if record is not None else None  # noqa: SIM115
        # A test hook: while the file UFFD_TEST_KILL_BEFORE_REPORT names exists, the handler
        # kills itself after reading a change and before reporting it (once: it removes it).
        self._kill_before_report = os.environ.get("UFFD_TEST_KILL_BEFORE_REPORT", "")
        # Events are read into the supervisor's journal (see _journal) when there is one.
        self._journal = journal
        self._export = export  # where to say "finished" if this handler ends alone
        # An out-of-core array's pager (see _pager); it writes back to ``store``, or to
        # ``pager_store`` for the supervisor's settling handler, which has no store to read.
        self._pager = None if pager is None else Pager(
            pager, store if store is not None else pager_store, stats, self._by_key
        )  # fmt: skip
        if self._pager is not None:
            self._filler.page_into(self._pager)
        self._writes: deque[tuple[Source, int]] = deque()  # WP faults: first writes
        self._answer: Answerer = answerer_for(
            store, policy, stats, journal, record=record is not None,
            in_flight=self._reads is not None, paged=pager is not None,
        )  # fmt: skip
        if store is not None:  # (the supervisor's poisoning handler serves nothing)
            stats.set(_stats.NATIVE, int(self._answer.path == NATIVE))
        self._background = False  # b"b": fill every page between faults
        self._cursors: dict[tuple[int, int], int] = {}  # where the background fill got to
        # Per source: the region list the fill walked last, and the index it got to (regions
        # before it are done), so a step does not walk every region again (a restored program
        # may have tens of thousands). A changed map is a new list: its walk starts over.
        self._walked: dict[int, tuple[list[RegionState], int]] = {}
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
        source = Source(key, uffd, RegionMap(states))
        self._sources[uffd.fileno()] = source
        self._by_key[key] = source
        return key

    def _release(self, source: Source) -> None:
        """Close a source. Only for one that is settled, or whose process or ranges are gone."""
        if source.uffd.closed:
            return
        with self._read_lock:
            fd = source.uffd.fileno()
            del self._sources[fd]
            self._by_key.pop(source.key, None)
            source.uffd.close()
        self._reports.send(Closed(source.key))

    def _release_gone(self) -> None:
        """Release the sources the filler found gone (ESRCH)."""
        while self._filler.gone:
            self._release(self._filler.gone.pop())

    def _next_stream(self) -> int:
        self._streams += 1
        return self._streams

    # -- the loop ----------------------------------------------------------------------------------
    def run(
        self, commands: int | None = None, control: int | None = None, serving: int | None = None
    ) -> None:
        """Serve until every served process is gone or has unmapped its ranges, or until a
        command: b"d" fills every page not filled yet, b"p" poisons them, then the handler exits;
        b"b" fills them in the background, between faults, and exits when all are in.

        ``commands`` comes from the supervisor. When it closes (the supervisor died), the
        handler goes on alone and takes its commands from the program's ``control`` pipe.
        ``serving``: a pipe closed once the handler is set up and about to wait for faults (the
        supervisor tells the program it is ready only then: a first fault costs what any does).
        """
        listening = commands if commands is not None else control
        watcher = threading.Thread(target=self._watch, name="uffd-event-watcher", daemon=True)
        watcher.start()
        if self._reads is not None:
            self._reads.start_prefetch()
        if serving is not None:
            os.close(serving)
        try:
            probed = time.monotonic()
            while self._sources:
                if self._background and not self._background_step():
                    self._release_gone()
                    self.finish(fill=True)  # every page is in
                    return
                busy = self._background or (self._reads is not None and self._reads.prefetch_ready)
                idle = 0 if busy else int(_PROBE_PERIOD * 1000)
                others = [self._wake_read] if listening is None else [self._wake_read, listening]
                ready, left = self._answer.wait(
                    list(self._sources.values()), others, idle, self.batch
                )
                for fd, events in left:  # events the answerer read and left to this loop
                    if (source := self._sources.get(fd)) is not None:
                        self._serve(source, events)
                if self._reads is not None and self._reads.prefetch_ready:
                    self._reads.prefetch_more()
                for fd in ready:
                    if fd == self._wake_read:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 4096)
                        self._serve(None)
                    elif fd == listening:
                        command = os.read(fd, 1)
                        if command in (b"d", b"p"):
                            self.finish(fill=command == b"d")
                            return
                        if command == b"f":
                            self._flush()
                            continue
                        if command == b"b" and self._pager is not None:
                            continue  # a budget is never filled whole: pages come on demand
                        if command == b"b":
                            self._background = True
                            if self._reads is not None:
                                self._reads.background = True
                            continue
                        listening = None  # EOF
                        if fd == commands:  # the supervisor is gone: go on alone
                            self._reports.orphaned()
                            listening = control
                    elif (source := self._sources.get(fd)) is not None:
                        self._serve(source)
                if time.monotonic() - probed >= _PROBE_PERIOD:
                    if self._record is not None:
                        self._record.flush()
                    self._probe()
                    probed = time.monotonic()
            if self._pager is not None:
                self._flush()  # nobody maps the array any more: its dirty pages go back now
        except BaseException as err:
            self.stats.note(f"the fault handler failed: {type(err).__name__}: {err}")
            if not self._reports.supervised:  # nobody else holds the uffds: settle them here
                _log.exception("the fault handler failed; poisoning every page not filled")
                self.finish(fill=False)
            raise
        finally:
            if not self._reports.supervised and not self._sources and self._export is not None:
                # Alone (the supervisor died) and every source settled or gone: finished, so
                # the program's watchdog (see _export) has nothing to settle.
                self._export.set_word(ENDED, 1)
            self._stopping.set()
            self._filler.reading.set()  # (the watcher may sleep on it)
            watcher.join()
            self.close()

    def _serve(self, source: Source | None, read: list[Event] | None = None) -> None:
        """Answer what is pending: the watcher's batches, a batch from ``source`` (``read``, if
        the answerer read it already), their faults."""
        started = time.perf_counter_ns()
        self._apply_all(self._collect([source] if source is not None else [], read))
        answered: set[tuple[int, int]] = set()  # threads faulting on one page: answer once
        while self._writes:
            owner, address = self._writes.popleft()
            if owner.uffd.closed or self._pager is None:
                continue
            self.stats.add(_stats.FAULTS)
            outcome = self._pager.write_fault(owner, address)
            if outcome is Outcome.CHANGED:
                self._catch_up()
                self._writes.appendleft((owner, address))
            elif outcome is Outcome.PROCESS_GONE:
                self._filler.gone.append(owner)
                self._release_gone()
        while self._faults:
            owner, address = self._faults.popleft()
            if owner.uffd.closed or (owner.key, address) in answered:
                continue
            outcome = self._resolve(owner, address)
            self._release_gone()
            if outcome is Outcome.CHANGED:
                self._catch_up()
                self._faults.appendleft((owner, address))  # resolve it again, from the new map
                continue
            answered.add((owner.key, address))
            if self._reads is None:
                self.stats.record_latency(time.perf_counter_ns() - started)
            if self._stash:
                self._apply_all(self._collect([]))
        if self._reads is not None:
            self._install_completed()

    def _install_completed(self) -> None:
        """Place the bytes of every read that has arrived, reading events whenever an install
        meets EAGAIN."""
        assert self._reads is not None
        while self._reads.install_completed() is Outcome.CHANGED:
            self._release_gone()
            self._catch_up()
        self._release_gone()

    def _collect(
        self, sources: list[Source], read: list[Event] | None = None
    ) -> list[tuple[Source, list[Event]]]:
        """The watcher's stashed batches, then one fresh batch from each of ``sources`` (for a
        single source, ``read`` if given: a batch read already)."""
        with self._read_lock:
            batches = list(self._stash)
            self._stash.clear()
            for source in sources:
                if not source.uffd.closed:
                    if read is not None:
                        events, read = read, None
                    else:
                        events = self._answer.serve(source, self.batch)
                    if events:
                        earlier = [batch for owner, batch in batches if owner is source]
                        self._report_read(source, events, earlier)
                        batches.append((source, events))
        return batches

    def _report_read(self, source: Source, events: list[Event], earlier: list[list[Event]]) -> None:
        """Tell the supervisor every change in ``events`` the moment they are read, in read
        order, before anything is served from the map: a handler that dies after this (in a
        slow store read, with the events still stashed) is restarted from a map that has them.
        REMOVE, UNMAP and REMAP as they are; for each FORK, the child's ranges as they were at
        the fork, and its uffd (until then this process holds the child's only descriptor, and
        dying would close it).

        The child is a copy of the parent at the fork, which the reading of the event ends: no
        COPY into the parent can land in between (the kernel answers EAGAIN while a FORK event
        is unread). So the child's map is the parent's as it is now, with the events read
        before the FORK but not applied yet (``earlier`` batches, and this one's) applied."""
        changes = [event for event in events if not isinstance(event, PageFault)]
        hook = self._kill_before_report
        if changes and hook and os.path.exists(hook):
            os.unlink(hook)  # once: a test's handler dies between its read and its report
            os.kill(os.getpid(), signal.SIGKILL)
        for event in changes:
            if isinstance(event, Remove | Unmap | Remap):
                self._reports.send(Changed(source.key, event))
        if any(isinstance(event, Fork) for event in changes):
            self._report_forks(source, events, earlier)
        if self._journal is not None and changes:
            self._journal.clear()  # all reported: nothing left to replay

    def _report_forks(
        self, source: Source, events: list[Event], earlier: list[list[Event]]
    ) -> None:
        at_fork = RegionMap([r.piece(r.address, r.end) for r in source.map.regions])
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
        reading = self._filler.reading
        while not self._stopping.is_set():
            if not self._filler.busy_since:
                reading.clear()
                if not self._filler.busy_since:  # (unless a read began since: then go on)
                    reading.wait()  # until a read begins, or the loop stops
                    continue
            if self._stopping.wait(_WATCH_PERIOD):
                break
            busy = self._filler.busy_since
            if not busy or time.monotonic() - busy < _WATCH_PERIOD:
                continue
            with self._read_lock:
                stashed = False
                for source in list(self._sources.values()):
                    with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                        if self._journal is not None:
                            events = self._journal.read(source.uffd.fileno(), source.key,
                                                        self.batch)  # fmt: skip
                        else:
                            events = source.uffd.read_events(self.batch)
                        if events:
                            earlier = [batch for owner, batch in self._stash if owner is source]
                            self._report_read(source, events, earlier)
                            self._stash.append((source, events))
                            stashed = True
                if stashed:
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._wake_write, b"\0")

    def _apply_all(self, batches: list[tuple[Source, list[Event]]]) -> None:
        for source, events in batches:
            for event in events:
                if not source.uffd.closed:
                    self._apply(source, event)

    def _apply(self, source: Source, event: Event) -> None:
        """Queue a fault; apply any other event to the map at once (and tell the supervisor)."""
        if isinstance(event, PageFault):
            if FaultFlag.WP in event.flags and self._pager is not None:
                self._writes.append((source, event.address))
            else:
                self._faults.append((source, event.address))
            return
        self.stats.add(_stats.EVENTS)
        if isinstance(event, Fork):
            child = Userfaultfd.from_fd(event.uffd, source.uffd.features)
            key, copies = self._fork_keys.pop(event.uffd)
            self.add(child, copies, key=key)
            return
        if isinstance(event, Remove | Unmap | Remap):
            source.map.change(event)  # (reported to the supervisor when it was read)
            if not source.map.regions:  # every range unmapped: nothing left to serve there
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
        otherwise poison every page not filled yet. An out-of-core array is never filled
        whole: its dirty pages are written back, and the pages not in memory are poisoned."""
        if self._pager is not None:
            self._finish_paged()
            return
        if fill and self._reads is not None:
            self._drain_in_flight()
        while self._sources:
            self._catch_up()  # events first: a FORK adds a source, a REMAP moves a range
            self._faults.clear()  # settling wakes every fault there is
            source = next(iter(self._sources.values()), None)
            if source is None:
                break
            outcome = self._settle(source, fill=fill and self.store is not None)
            self._release_gone()
            if outcome is Outcome.DONE:
                self._release(source)
        self.close()

    def _finish_paged(self) -> None:
        assert self._pager is not None
        self._catch_up()
        self._flush()
        while self._sources:
            self._catch_up()
            self._faults.clear()  # settling wakes every fault there is
            self._writes.clear()
            source = next(iter(self._sources.values()))
            outcome = self._pager.settle(source)
            if outcome is Outcome.PROCESS_GONE:
                self._filler.gone.append(source)
            self._release_gone()
            if outcome is Outcome.DONE:
                self._release(source)
        self.close()

    def _flush(self) -> None:
        """Write back every dirty page and make them durable; say so (or the errno) in the
        stats, for the flush the program asked for last (see Server.flush)."""
        assert self._pager is not None
        asked = self.stats.value(_stats.FLUSH_ASKED)
        while (failed := self._pager.flush()) is None:
            self._catch_up()  # a FORK, REMAP or UNMAP first: the kernel refuses WP until then
        self.stats.set(_stats.FLUSH_ERRNO, failed)
        self.stats.set(_stats.FLUSH_DONE, asked)

    def _settle(self, source: Source, *, fill: bool) -> Outcome:
        for region in list(source.map.regions):
            for first, last in list(unsettled_runs(region, 0, region.pages)):
                if fill:
                    outcome = self._filler.fill(source, region, first, last, must=(first, last),
                                                leave_zeros=True)  # fmt: skip
                else:
                    outcome = self._filler.place(source, region, first, last, Fill.POISON)
                if outcome is not Outcome.DONE:
                    return outcome
        return Outcome.DONE

    def close(self) -> None:
        """Release the buffer. Sources still open are left to whoever holds their copies."""
        if self._reads is not None:
            self._reads.close()
            self._reads = None
        if self._record is not None:
            self._record.close()
            self._record = None
        if not self._filler.closed:
            self._filler.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _background_step(self) -> bool:
        """Fill the next run of pages not filled yet, answering faults first (the loop polls
        between steps); False once every page is in."""
        for source in list(self._sources.values()):
            regions = source.map.regions
            walked = self._walked.get(source.key)
            resume = walked[1] if walked is not None and walked[0] is regions else 0
            for at in range(resume, len(regions)):
                region = regions[at]
                self._walked[source.key] = (regions, at)
                cursor = (source.key, region.offset)
                start = self._cursors.get(cursor, 0)
                for first, last in unsettled_runs(region, start, region.pages):
                    page = region.page_size
                    if self._reads is None:
                        last = min(last, first + max(1, self._filler.buffer_bytes // page))
                        outcome = self._filler.fill(
                            source, region, first, last, must=(first, last), leave_zeros=True
                        )
                        self._release_gone()
                        if outcome is Outcome.CHANGED:
                            self._catch_up()
                        return True
                    fetcher = self._reads.fetcher
                    if len(fetcher.pending) >= fetcher.workers:
                        return True  # enough in flight: wait for them
                    covering = fetcher.covering(source.key, region.offset + first * page)
                    if covering is None:
                        last = min(last, first + max(1, fetcher.unit // page))
                        outcome = self._reads.install_held(source, region, first, last)
                        self._release_gone()
                        if outcome is Outcome.CHANGED:
                            self._catch_up()
                            return True
                        self._reads.ask(source, region, first, last, demand=False)
                    else:
                        last = -(-(covering.end - region.offset) // page)
                    self._cursors[cursor] = last
                    return True
                self._cursors[cursor] = region.pages
        if self._reads is not None and not self._reads.idle:
            return True
        regions = [r for source in self._sources.values() for r in source.map.regions]
        if any(next(unsettled_runs(r, 0, r.pages), None) for r in regions):
            self._cursors.clear()  # pages the store failed on, or ranges that moved: go again
            self._walked.clear()
            return True
        return False

    def _drain_in_flight(self) -> None:
        """Fill every page not filled yet with many reads in flight (before finish's own pass,
        which then only settles what this could not: pages the store failed on)."""
        assert self._reads is not None
        for source in list(self._sources.values()):
            for region in list(source.map.regions):
                outcome = self._reads.install_held(source, region, 0, region.pages)
                self._release_gone()
                if outcome is Outcome.CHANGED:
                    self._catch_up()
                self._reads.ask(source, region, 0, region.pages, demand=False)
        while not self._reads.idle and self._sources:
            ready = readable([self._wake_read], 0.05)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
            self._apply_all(self._collect(list(self._sources.values())))
            self._faults.clear()  # the drain fills every page: it wakes every fault there is
            self._install_completed()

    def _resolve(self, source: Source, address: int) -> Outcome:
        region = source.map.find(address)
        page = mmap.PAGESIZE if region is None else region.page_size
        if region is None:  # no map says where this page comes from: SIGBUS beats a hang
            self.stats.add(_stats.ERRORS)
            self.stats.note(f"a fault at 0x{address:x} is in no range the handler knows of: "
                            "poisoned")  # fmt: skip
            with contextlib.suppress(UserfaultfdError):
                source.uffd.poison(address - address % page, page)
            return Outcome.DONE
        index = (address - region.address) // page
        self.stats.add(_stats.FAULTS)
        if self._record is not None and source.key == PROGRAM:  # a touch: (page, 0)
            self._record.write(RECORD.pack(region.offset + index * page, 0))
        if region.settled[index]:
            self.stats.add(_stats.WAKES)
            source.uffd.wake(region.at(index), page)
            return Outcome.DONE
        if region.removed[index]:
            return self._filler.place(source, region, index, index + 1, Fill.ZERO)
        if self._reads is not None:
            offset = region.offset + index * page
            fetch = self._reads.fetcher.covering(source.key, offset)
            if fetch is not None and fetch.marker != offset:
                # Its bytes are on the way: wait for them. The policy is not asked, since this
                # is no new access, only the program catching up with the read-ahead.
                fetch.waiters.append((source.key, region.at(index), time.perf_counter_ns()))
                self._reads.fetcher.promote(fetch)
                return Outcome.DONE
        start, end = self.policy.window(index, region.pages, page, region.stream)
        start, end = max(start, 0), min(max(end, index + 1), region.pages)
        if self._record is not None and source.key == PROGRAM:
            self._record.write(RECORD.pack(region.offset + start * page, (end - start) * page))
        if self._reads is not None:
            return self._reads.request(source, region, index, start, end)
        # The faulting page's run first (it wakes the faulting thread), then the rest.
        run_end = index
        while run_end < end and not region.settled[run_end] and not region.removed[run_end]:
            run_end += 1
        outcome = self._filler.fill(source, region, index, run_end, must=(index, index + 1))
        for first, last in list(unsettled_runs(region, start, end)):
            if outcome is not Outcome.DONE:
                break
            outcome = self._filler.fill(source, region, first, last, must=(0, 0))
        return outcome

"""Out-of-core arrays: pages in shmem under a budget, written back through write-protect.

Design note: the protocol, and the kernel facts it stands on
-------------------------------------------------------------
- A budgeted array is a memfd mapped MAP_SHARED into the program (its forked children share
  it, as they share an ``np.memmap(mode="r+")``), registered MISSING, and WP too when writable.
  The supervisor holds the memfd as well, so every handler it starts can read the pages back.
- Right after registering, the program write-protects the whole range. On shmem that leaves a
  uffd-wp PTE marker in every empty PTE, so a page that reaches the page cache through another
  process (a child's fault) is mapped protected here too, and its first write raises a WP
  fault. Without the marker the kernel would map it writable and the write would go unseen.
- Reads fill with COPY in WP mode. The first write to a page raises a WP fault: the handler
  marks the page dirty, *then* lifts the protection (of that page, in that process).
- Eviction of a unit (2 MiB-aligned where the budget allows, as crosvm's swap does):
  write-protect it in every process (a writer now waits), copy its dirty pages from the memfd
  to the store and mark them clean, punch the hole (fallocate PUNCH_HOLE), forget them, wake the
  waiters: they fault again and are filled again from the store, which has their bytes.
- That is safe only where no page is mapped behind the handler in the range and where the
  protection survives the punch (PTE markers): the seed's patch and Linux 5.19. Elsewhere a
  fault-around after the punch maps the page writable and the next write is lost at the next
  eviction (``uffd model run pager-evict`` finds it on ``pre-patch``). ``lazy(budget=,
  writable=True)`` asks :func:`userfaultfd.check.pager_guarantees` first. A read-only array
  needs neither: every page the kernel could map holds the store's bytes.
- fallocate(PUNCH_HOLE) on shmem raises no REMOVE event (MADV_REMOVE would, and the handler
  would wait for itself), and a POISON onto a PTE marker fails with EEXIST: settling a page
  that is not in memory first lifts the marker.
- Each page's state (absent, clean, dirty) is in memory shared with the supervisor, written in
  an order that loses nothing at any death: dirty before the protection is lifted, clean after
  the write-back and before the punch. A restarted handler rebuilds its counts from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import final

from .. import _abi, _libc
from .._errors import MappingChangedError, ProcessGoneError, UserfaultfdError
from ..stores import Store
from . import _stats
from ._fill import Outcome, Source
from ._ranges import RegionState
from ._stats import StatsBlock

__all__ = ["ABSENT", "CLEAN", "DIRTY", "Pager", "PagerSetup", "eviction_unit"]

_log = logging.getLogger("userfaultfd.runtime")

#: A page's state, one byte per page of the memfd.
ABSENT, CLEAN, DIRTY = 0, 1, 2

_LARGEST_UNIT = 2 << 20
_WRITE_BLOCK = 64
#: A page's state as a settled bit (bytes.translate): in memory, clean or dirty.
_IN_MEMORY = bytes([0, 1, 1]) + bytes(253)
_WRITE_BACK_BYTES = 256 << 10
_WRITTEN_KEPT = 16


def eviction_unit(budget: int, page: int) -> int:
    """Pages evicted together: 2 MiB, or less so that the budget holds at least 8 units."""
    unit = _LARGEST_UNIT
    while unit > page and unit * 8 > budget:
        unit //= 2
    return unit // page


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PagerSetup:
    """What every handler of one budgeted array needs, made in the program before the fork."""

    memfd: int
    #: The memfd's length (whole pages) and the store offset of its first byte.
    length: int
    offset: int
    page: int
    budget_pages: int
    unit_pages: int
    writable: bool
    #: One state byte per page (MAP_SHARED: the program, the supervisor and handlers see it).
    states: mmap.mmap

    @property
    def pages(self) -> int:
        return self.length // self.page


@final
class Pager:
    """The handler's part that keeps a budgeted array's pages within the budget and writes
    its dirty pages back. ``sources`` is the handler's live table of sources, by key."""

    def __init__(
        self, setup: PagerSetup, store: Store | None, stats: StatsBlock,
        sources: Mapping[int, Source],
    ) -> None:  # fmt: skip
        self.setup = setup
        self.writable = setup.writable
        self._store = store
        self._stats = stats
        self._sources = sources
        self._states = memoryview(setup.states)
        self._unit = setup.unit_pages
        units = -(-setup.pages // self._unit)
        # Resident pages per unit, and units in the order they first got a page (FIFO).
        self._counts = [0] * units
        self._order: deque[int] = deque()
        dirty = 0
        for unit in range(units):
            states = bytes(self._states[unit * self._unit : (unit + 1) * self._unit])
            self._counts[unit] = len(states) - states.count(ABSENT)
            dirty += states.count(DIRTY)
            if self._counts[unit]:
                self._order.append(unit)
        self._resident = sum(self._counts)
        stats.set(_stats.RESIDENT, self._resident)
        stats.set(_stats.DIRTY, dirty)
        # Write-back goes through this many pages at a time: the handler's memory is outside
        # the budget, and a memory cgroup the program runs in counts it.
        self._copy_pages = max(1, min(self._unit, _WRITE_BACK_BYTES // setup.page))
        self._buffer = bytearray(self._copy_pages * setup.page)
        #: errno of the last write-back that failed (0: none since the last flush).
        self.failed = 0
        # The block of the last write fault (see write_fault).
        self._last_block = -2
        # Ranges written back lately: their pages leave the page cache once written (dont_need
        # starts writing them out; a later call waits for that and drops them). A memory cgroup
        # of version 1 does not hold back a writer whose dirty pages fill it: it kills it.
        self._written: deque[tuple[int, int]] = deque(maxlen=_WRITTEN_KEPT)

    @property
    def resident(self) -> int:
        return self._resident

    # -- where a page is -------------------------------------------------------------------
    def index(self, region: RegionState, page_in_region: int) -> int:
        """The memfd page behind page ``page_in_region`` of ``region``."""
        return (region.offset - self.setup.offset) // self.setup.page + page_in_region

    def _pieces(
        self, source: Source, first: int, last: int
    ) -> Iterator[tuple[RegionState, int, int]]:
        """(region, first, last) of ``source`` mapping memfd pages [first, last)."""
        for region in source.map.regions:
            start = self.index(region, 0)
            lo, hi = max(first, start), min(last, start + region.pages)
            if lo < hi:
                yield region, lo - start, hi - start

    # -- filling ---------------------------------------------------------------------------
    def admit(self, count: int) -> Outcome:
        """Make room for ``count`` pages about to be filled: evict the oldest units until they
        fit (or nothing more can go)."""
        budget = self.setup.budget_pages
        # One round at most: units whose dirty pages cannot be written back (a full disk) go
        # to the back again, and a second round would only fail again, for ever. Over the
        # budget then, but no write is dropped and no fault waits; flush() says why.
        tries = len(self._order)
        while self._resident + count > budget and self._order and tries > 0:
            tries -= 1
            unit = self._order.popleft()
            if not self._counts[unit]:
                continue
            outcome = self._evict(unit)
            if outcome is Outcome.CHANGED:
                self._order.appendleft(unit)
                return outcome
        return Outcome.DONE

    def install(
        self, source: Source, region: RegionState, first: int, last: int, src: int | None,
        *, wake: bool = True,
    ) -> tuple[Outcome, int]:  # fmt: skip
        """Put pages [first, last) of ``region`` that are out of memory into the memfd: the
        bytes at address ``src`` (for page ``first``), or zeros for None; then wake the threads
        waiting on the range in ``source`` (unless not ``wake``). Returns the outcome and the
        pages put in.

        Writing into the memfd (then waking) rather than UFFDIO_COPY: a copy into shmem costs
        a page allocation, a page-cache insertion and a PTE per page, and this is one write
        per run (2.3x faster for a sequential scan here); the program then maps each page with
        a minor fault of its own, which the seed keeps to one page at a time. A writable
        array's pages are still mapped protected: the PTE markers make them so.

        The bytes must be in this process's own memory (``src``), never in a mapping of the
        store: the page is in the page cache, where the program can map it, from the moment
        its write begins, and a write that faults on its source halfway (a store page
        reclaimed meanwhile) leaves it there with zeros past the fault until it resumes. From
        private memory each page is copied whole while it is locked."""
        page = self.setup.page
        base = self.index(region, 0)
        absent = list(_runs(self.setup.states, base + first, base + last, ABSENT))
        needed = sum(hi - lo for lo, hi in absent)
        if needed and (outcome := self.admit(needed)) is not Outcome.DONE:
            return outcome, 0
        for lo, hi in absent:
            try:
                if src is None:
                    _libc.fallocate(self.setup.memfd, 0, lo * page, (hi - lo) * page)
                else:
                    start = src + (lo - base - first) * page
                    data = memoryview((ctypes.c_char * ((hi - lo) * page)).from_address(start))
                    done = 0
                    while done < len(data):
                        done += os.pwrite(self.setup.memfd, data[done:], lo * page + done)
            except OSError as err:  # the memory cgroup is full, or the source mapping failed
                message = (f"the pager could not put {hi - lo} pages into memory: {err}; "
                           "pages that are waited on are poisoned")  # fmt: skip
                self._stats.note(message)
                _log.warning("%s", message)
                return Outcome.STORE_FAILED, 0
            self._mark_in(lo, hi)
        if wake:
            try:
                source.uffd.wake(region.at(first), (last - first) * page)
            except ProcessGoneError:
                return Outcome.PROCESS_GONE, needed
        return Outcome.DONE, needed

    def present(self, region: RegionState, first: int, last: int) -> bytes:
        """Pages [first, last) of ``region`` as settled bits: 1 for a page in memory. (Room
        made for a fill may have evicted pages of its own window: those are not settled.)"""
        base = self.index(region, 0)
        return bytes(self._states[base + first : base + last]).translate(_IN_MEMORY)

    def _mark_in(self, first: int, last: int) -> None:
        self._states[first:last] = bytes([CLEAN]) * (last - first)
        for unit in range(first // self._unit, (last - 1) // self._unit + 1):
            added = min(last, (unit + 1) * self._unit) - max(first, unit * self._unit)
            if not self._counts[unit]:
                self._order.append(unit)
            self._counts[unit] += added
        self._resident += last - first
        self._stats.set(_stats.RESIDENT, self._resident)

    def poison(self, source: Source, region: RegionState, first: int, last: int) -> None:
        """Poison pages [first, last) of ``region`` in ``source`` (a write-protect marker is
        lifted first: POISON onto one fails with EEXIST)."""
        address, length = region.at(first), (last - first) * self.setup.page
        if self.writable:
            source.uffd.writeprotect(address, length, False, wake=False)
        source.uffd.poison(address, length)

    def write_fault(self, source: Source, address: int) -> Outcome:
        """The first write to a protected page: mark it dirty, then let the writer go. A write
        next to the last one (in the same aligned block of 64 pages, or a neighbouring one: a
        sort's partition going up or down, a fill) lets go of the pages in memory of its whole
        block: one fault, not one per page, at the cost of writing back pages it may not
        change; a write anywhere else, of its page only."""
        page = self.setup.page
        address -= address % page
        region = source.map.find(address)
        try:
            if region is None:
                source.uffd.wake(address, page)
                return Outcome.DONE
            at = self.index(region, (address - region.address) // page)
            state = self._states[at]
            if state == ABSENT and self._present(at):  # (put in by a handler that died then)
                self._mark_in(at, at + 1)
                state = CLEAN
            if state == ABSENT:  # evicted since: it faults again, and is filled again
                source.uffd.wake(address, page)
                return Outcome.DONE
            block = at // _WRITE_BLOCK
            start, end = at, at + 1
            if abs(block - self._last_block) <= 1:  # a writer going on: its whole block
                base = self.index(region, 0)
                low = max(base, block * _WRITE_BLOCK)
                high = min(base + region.pages, (block + 1) * _WRITE_BLOCK)
                while start > low and self._states[start - 1] != ABSENT:
                    start -= 1
                while end < high and self._states[end] != ABSENT:
                    end += 1
            self._last_block = block
            clean = bytes(self._states[start:end]).count(CLEAN)
            self._states[start:end] = bytes([DIRTY]) * (end - start)  # before the protection goes
            self._stats.add(_stats.DIRTY, clean)
            source.uffd.writeprotect(address - (at - start) * page, (end - start) * page, False)
        except MappingChangedError:
            return Outcome.CHANGED
        except ProcessGoneError:
            return Outcome.PROCESS_GONE
        except UserfaultfdError as err:
            if err.errno != errno.ENOENT:  # (unmapped meanwhile: its UNMAP follows)
                raise
        return Outcome.DONE

    def _present(self, at: int) -> bool:
        """Whether memfd page ``at`` holds a page (SEEK_DATA finds data there)."""
        page = self.setup.page
        try:
            return os.lseek(self.setup.memfd, at * page, os.SEEK_DATA) == at * page
        except OSError:  # ENXIO: no data from there to the end
            return False

    # -- giving pages back -----------------------------------------------------------------
    def _protect(self, first: int, last: int) -> Outcome:
        """Write-protect memfd pages [first, last) in every process that maps them."""
        page = self.setup.page
        for source in list(self._sources.values()):
            for region, lo, hi in self._pieces(source, first, last):
                try:
                    # (The kernel refuses WP with DONTWAKE: EINVAL. Nobody waits there anyway.)
                    source.uffd.writeprotect(region.at(lo), (hi - lo) * page, True)
                except MappingChangedError:
                    return Outcome.CHANGED
                except ProcessGoneError:
                    pass  # its process is gone: the loop releases it
                except UserfaultfdError as err:
                    if err.errno != errno.ENOENT:  # (unmapped meanwhile: its UNMAP follows)
                        raise
        return Outcome.DONE

    def _evict(self, unit: int) -> Outcome:
        first = unit * self._unit
        last = min(first + self._unit, self.setup.pages)
        if self.writable:
            outcome = self._protect(first, last)
            if outcome is not Outcome.DONE:
                return outcome
            self._write_back(first, last)
        evicted = 0
        page = self.setup.page
        for lo, hi in _runs(self.setup.states, first, last, CLEAN):
            _libc.fallocate(
                self.setup.memfd, _abi.FALLOC_FL_PUNCH_HOLE | _abi.FALLOC_FL_KEEP_SIZE,
                lo * page, (hi - lo) * page,
                describe=lambda code: f"fallocate(PUNCH_HOLE) of the pager's memfd: "
                f"{os.strerror(code)}",
            )  # fmt: skip
            self._states[lo:hi] = bytes(hi - lo)
            evicted += hi - lo
            self._forget(lo, hi)
        self._counts[unit] -= evicted
        if self._counts[unit]:  # dirty pages whose write-back failed stay, at the back
            self._order.append(unit)
        self._resident -= evicted
        self._stats.set(_stats.RESIDENT, self._resident)
        self._stats.add(_stats.EVICTED, evicted)
        return Outcome.DONE

    def _forget(self, first: int, last: int) -> None:
        """Pages [first, last) are out of memory: not settled anywhere; wake their waiters."""
        page = self.setup.page
        for source in list(self._sources.values()):
            for region, lo, hi in self._pieces(source, first, last):
                region.settled[lo:hi] = bytes(hi - lo)
                with contextlib.suppress(UserfaultfdError):
                    source.uffd.wake(region.at(lo), (hi - lo) * page)

    def _write_back(self, first: int, last: int) -> None:
        """Copy the dirty pages of [first, last) to the store (write-protected by the caller)
        and mark them clean; a failure is counted and noted, and its pages stay dirty."""
        for lo, hi in _runs(self.setup.states, first, last, DIRTY):
            for start in range(lo, hi, self._copy_pages):
                end = min(hi, start + self._copy_pages)
                if self._copy_out(start, end):
                    self._states[start:end] = bytes([CLEAN]) * (end - start)
                    self._stats.add(_stats.DIRTY, -(end - start))
                    self._stats.add(_stats.WRITTEN_BACK, end - start)

    def _copy_out(self, first: int, last: int) -> bool:
        page = self.setup.page
        offset = self.setup.offset + first * page
        view = memoryview(self._buffer)[: (last - first) * page]
        try:
            if self._store is None:
                raise OSError(errno.EROFS, "no store to write to")
            got = os.preadv(self.setup.memfd, [view], first * page)
            # The last page may pass the store's end: only the store's bytes go back.
            size = max(0, min(got, self._store.size - offset))
            self._store.write_from(offset, view[:size])
            # The store's copy need not stay in memory: only the memfd counts against the
            # budget, and a memory cgroup the program runs in must not fill with it.
            self._store.dont_need(offset, size)  # written out from now, dropped when it is
            if len(self._written) == self._written.maxlen:
                old_offset, old_size = self._written[0]
                self._store.dont_need(old_offset, old_size, wait=True)
            self._written.append((offset, size))
        except OSError as err:
            self.failed = err.errno or errno.EIO
            self._stats.add(_stats.WRITE_ERRORS)
            message = (f"writing back {last - first} dirty pages at store offset {offset} "
                       f"failed: {err}; they stay in memory, dirty")  # fmt: skip
            self._stats.note(message)
            _log.warning("%s", message)
            return False
        finally:
            view.release()
        return True

    def flush(self) -> int | None:
        """Write every dirty page back and make the store durable; 0, or the errno of a
        write-back that failed since the last flush (those pages stay dirty); None when an
        event waits to be read first (EAGAIN: read the events, then call again)."""
        for lo, hi in list(_runs(self.setup.states, 0, self.setup.pages, DIRTY)):
            if self.writable and self._protect(lo, hi) is Outcome.CHANGED:
                return None  # (what was written back so far stays clean: no work is lost)
            self._write_back(lo, hi)
        failed, self.failed = self.failed, 0
        if self._store is not None and self.writable and not failed:
            try:
                self._store.sync()
            except OSError as err:
                failed = err.errno or errno.EIO
                self._stats.add(_stats.WRITE_ERRORS)
                self._stats.note(f"the store could not make the written pages durable: {err}")
        return failed

    def settle(self, source: Source) -> Outcome:
        """Poison the pages of ``source`` that are not in memory, before its uffd is closed:
        once the range is unregistered, a missing shmem page would read zeros. (The marker is
        lifted first: POISON onto a marker fails with EEXIST.)"""
        page = self.setup.page
        for region in list(source.map.regions):
            base = self.index(region, 0)
            for lo, hi in list(_runs(self.setup.states, base, base + region.pages, ABSENT)):
                address, length = region.at(lo - base), (hi - lo) * page
                try:
                    if self.writable:
                        source.uffd.writeprotect(address, length, False, wake=False)
                    source.uffd.poison(address, length)
                    self._stats.add(_stats.POISONED, hi - lo)
                except MappingChangedError:
                    return Outcome.CHANGED
                except ProcessGoneError:
                    return Outcome.PROCESS_GONE
                except UserfaultfdError as err:
                    if err.errno != errno.ENOENT:
                        raise
        return Outcome.DONE


_RUN_OF = {state: re.compile(re.escape(bytes([state])) + b"+") for state in (ABSENT, CLEAN, DIRTY)}


def _runs(states: mmap.mmap, first: int, last: int, state: int) -> Iterator[tuple[int, int]]:
    """Runs [lo, hi) of pages in [first, last) in ``state`` (found by the regex engine: a
    flush looks at every page of the array)."""
    for found in _RUN_OF[state].finditer(states, first, last):
        yield found.start(), found.end()

"""Settling pages: one ioctl per run of pages, COPY from the store's bytes, ZEROPAGE or POISON.

Design note: what the kernel's answers mean to a filler
--------------------------------------------------------
- COPY wakes the threads blocked in the range it fills, so the faulting page is copied first and
  the rest of the window after it.
- EEXIST is reported for the first page of a COPY only: that page is there already (another
  fill won); it is settled, woken, and the copy goes on from the next page.
- EAGAIN means a FORK, REMAP, REMOVE or UNMAP event is queued and unread (or a multi-page copy
  stopped at a page already there), with the pages done so far. Filling only reports this
  (``Outcome.CHANGED``): the handler's loop owns all event reading.
- ESRCH: the process is gone (its address space is torn down). The filler only reports it
  (``Outcome.PROCESS_GONE``, and the source in :attr:`Filler.gone`): the loop releases it.
- Bytes the store cannot give (an exception, a short read inside the store) are never
  zero-filled: the faulting page is poisoned (SIGBUS), counted and logged. Only the tail of the
  last page past the store's end is zero-padded.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import logging
import mmap
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from .._buffer import pinned
from .._core import Userfaultfd
from .._errors import MappingChangedError, PageExistsError, ProcessGoneError, UserfaultfdError
from ..stores import Store
from . import _stats
from ._fetch import read_range
from ._ranges import RegionMap, RegionState
from ._stats import StatsBlock

if TYPE_CHECKING:
    from ._pager import Pager

__all__ = ["PROGRAM", "Fill", "Filler", "Outcome", "Source", "store_failed"]

#: The key of the program's own source (its forked children's come after it).
PROGRAM = 1

_log = logging.getLogger("userfaultfd.runtime")

#: A read this large is a stream's window: the store is told the next one will be read too.
_READ_AHEAD_FROM = 64 << 10
#: A store read that fails faster than this may be tried again on a smaller range.
_QUICK_FAILURE = 0.1


def store_failed(
    stats: StatsBlock, store: Store | None, offset: int, size: int, err: BaseException
) -> None:
    """Count, log and note (``Stats.last_error``) a read the store could not give."""
    stats.add(_stats.ERRORS)
    message = (f"store {store!r} failed at offset {offset} ({size} bytes): "
               f"{type(err).__name__}: {err}; pages that are waited on are poisoned")  # fmt: skip
    stats.note(message)
    _log.warning("%s", message)


class Outcome(enum.Enum):
    """What an attempt to settle pages came to."""

    DONE = enum.auto()  #: the pages are settled (or the store failed for pages nobody waits on)
    CHANGED = enum.auto()  #: EAGAIN: read the pending events, then try again
    PROCESS_GONE = enum.auto()  #: ESRCH: the process is gone (the source is in Filler.gone)
    STORE_FAILED = enum.auto()  #: the source bytes could not be read (a mapped store shrank)


class Fill(enum.Enum):
    """How pages are settled."""

    COPY = enum.auto()  #: from the store's bytes
    KNOWN_ZERO = enum.auto()  #: zeros the store knows of, without a read (counted as zeros)
    ZERO = enum.auto()  #: zeros for pages the program dropped
    POISON = enum.auto()  #: SIGBUS on access


@dataclass(slots=True, eq=False)
class Source:
    """One uffd (the program's, or a forked child's), its key, and the map of its ranges."""

    key: int
    uffd: Userfaultfd
    map: RegionMap


@final
class Filler:
    """Settles pages of a source from ``store`` through a buffer of ``buffer_bytes`` (or
    poisons them): the part of the handler that makes the ioctls. It answers with an
    :class:`Outcome` and never acts on one: a source whose process is gone is only noted in
    :attr:`gone`, for the loop to release."""

    def __init__(self, store: Store | None, stats: StatsBlock, buffer_bytes: int) -> None:
        self.store = store
        self.stats = stats
        self._buffer = mmap.mmap(-1, buffer_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._buffer)
        self._resources = ExitStack()
        self._buffer_address, _ = self._resources.enter_context(pinned(self._buffer))
        self._zero_map: mmap.mmap | None = None
        self._zero_address = 0
        # Only a store that overrides known_zero is asked page by page; one whose bytes are
        # mapped says where its zero runs are at once (Store.mapped(): address 0).
        self._knows_zeros = store is not None and type(store).known_zero is not Store.known_zero
        self._segments = store.mapped() if self._knows_zeros and store is not None else None
        self._segment_starts = [start for start, _n, _a in self._segments or []]
        #: When the store read in progress started (0: none): the watcher reads events meanwhile.
        self.busy_since = 0.0
        #: Set when a store read begins: the handler's watcher sleeps on it between reads
        #: (polling instead woke every handler 500 times a second, 60,000 with 120 arrays).
        self.reading = threading.Event()
        self._failed_quickly = True
        #: Sources an ioctl found gone (ESRCH), for the loop to release.
        self.gone: list[Source] = []
        #: An out-of-core array's pager (see _pager): asked for room before every page goes in,
        #: told of every page that went in; pages go in write-protected when it is writable.
        self.pager: Pager | None = None

    def page_into(self, pager: Pager) -> None:
        """Fill through ``pager`` (see _pager): from this process's buffer, never from a
        mapping of the store (see Pager.install), which then forgets the bytes read."""
        self.pager = pager

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    @property
    def buffer_bytes(self) -> int:
        """The most one read of the store may bring in."""
        return len(self._view)

    def buffer(self, data: bytes) -> int:
        """The buffer's address, holding ``data`` (a page kept back, placed later)."""
        self._view[: len(data)] = data
        return self._buffer_address

    def close(self) -> None:
        self._view.release()
        self._resources.close()
        # A store's exception kept somewhere (a log handler's record) may still hold a view of
        # the buffer through its traceback: then the buffer is freed when this process exits.
        with contextlib.suppress(BufferError):
            self._buffer.close()
        if self._zero_map is not None:
            self._zero_map.close()

    def zeros(self, length: int) -> int:
        """The address of ``length`` zero bytes (a mapping never written)."""
        if self._zero_map is None or len(self._zero_map) < length:
            self._zero_map = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                       prot=mmap.PROT_READ)  # fmt: skip
            self._zero_address, _ = self._resources.enter_context(pinned(self._zero_map))
        return self._zero_address

    def run_of_kind(self, region: RegionState, first: int, last: int) -> tuple[int, bool]:
        """The longest run [first, end) of pages in [first, last) that the store knows are all
        zero, or that it does not: (end, whether they are zero)."""
        assert self.store is not None
        page = region.page_size
        if not self._knows_zeros:
            return last, False
        if self._segments:
            offset = region.offset + first * page
            at = bisect.bisect_right(self._segment_starts, offset) - 1
            if at >= 0 and offset + page <= (end := self._segments[at][0] + self._segments[at][1]):
                # Whole pages up to the run's end are of its kind (zeros where address is 0).
                return min(last, first + (end - offset) // page), self._segments[at][2] == 0
        if self.store.known_zero(region.offset + first * page, (last - first) * page):
            return last, True
        zero = self.store.known_zero(region.offset + first * page, page)
        end = first + 1
        while end < last and self.store.known_zero(region.offset + end * page, page) == zero:
            end += 1
        return end, zero

    def fill(
        self, source: Source, region: RegionState, first: int, last: int, must: tuple[int, int],
        *, leave_zeros: bool = False,
    ) -> Outcome:  # fmt: skip
        """Copy pages [first, last) of ``region`` from the store. Pages in ``must`` that the
        store cannot give are poisoned; others are left for a later fault to try again.
        ``leave_zeros`` (a fill to the end: in the background, a drain): pages the store knows
        are zero are not mapped but marked to read zeros (``removed``), as the kernel fills
        them once the range is let go; a fault on one meanwhile gets a zero page. (CRIU's own
        daemon leaves the holes of a lazy restore alone too: mapping them cost time and memory
        for pages the program never touched.)"""
        assert self.store is not None
        page = region.page_size
        chunk = max(1, len(self._view) // page)
        index = first
        while index < last:
            stop, zero = self.run_of_kind(region, index, min(last, index + chunk))
            offset, size = region.offset + index * page, (stop - index) * page
            if zero and leave_zeros:
                region.removed[index:stop] = b"\x01" * (stop - index)
                index = stop
                continue
            if zero:
                outcome = self.place(source, region, index, stop, Fill.KNOWN_ZERO)
                if outcome is not Outcome.DONE:
                    return outcome
                index = stop
                continue
            src = self.read(offset, size)
            outcome = Outcome.STORE_FAILED
            if src is not None:
                outcome = self.place(source, region, index, stop, Fill.COPY, src)
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

    def _fill_or_poison(
        self, source: Source, region: RegionState, first: int, last: int, tried: tuple[int, int]
    ) -> Outcome:
        """After the store failed for pages ``tried``, fill [first, last) in halves, down to
        single pages, and poison only the pages it cannot give: a bad chunk of a pack read
        ahead must not cost the faulting page that lies outside it. A store that fails slowly
        (a timeout: the network is down) is not asked again: everything left is poisoned."""
        if tried == (first, last):
            if last - first == 1 or not self._failed_quickly:
                return self.place(source, region, first, last, Fill.POISON)
            middle = (first + last) // 2
            outcome = self._fill_or_poison(source, region, first, middle, (first, middle))
            if outcome is Outcome.DONE:
                outcome = self._fill_or_poison(source, region, middle, last, (middle, last))
            return outcome
        page = region.page_size
        src = self.read(region.offset + first * page, (last - first) * page)
        outcome = Outcome.STORE_FAILED
        if src is not None:
            outcome = self.place(source, region, first, last, Fill.COPY, src)
        if outcome is Outcome.STORE_FAILED:
            return self._fill_or_poison(source, region, first, last, (first, last))
        return outcome

    def read(self, offset: int, size: int) -> int | None:
        """The address of store bytes [offset, offset + size), or None if the store failed."""
        assert self.store is not None
        self.busy_since = time.monotonic()
        self.reading.set()
        try:
            if size >= _READ_AHEAD_FROM:  # a stream: the next window of it is read meanwhile
                self.store.will_need(offset, 2 * size)
            mapped = None if self.pager is not None else self.store.address(offset, size)
            if mapped is not None:
                return mapped
            read_range(self.store, offset, self._view[:size])
            if self.pager is not None:
                self.store.dont_need(offset, size)
            return self._buffer_address
        except Exception as err:  # any failure of the store is a page it cannot give
            self._failed_quickly = time.monotonic() - self.busy_since < _QUICK_FAILURE
            store_failed(self.stats, self.store, offset, size, err)
            return None
        finally:
            self.busy_since = 0.0

    def place(
        self, source: Source, region: RegionState, first: int, last: int, how: Fill,
        src: int = 0, *, wake: bool = True,
    ) -> Outcome:  # fmt: skip
        """Settle pages [first, last) by one ioctl (COPY from ``src``, ZEROPAGE or POISON),
        going on past pages that are there already."""
        if self.pager is not None:
            return self._place_paged(source, region, first, last, how, src, wake=wake)
        page = region.page_size
        while first < last:
            address, length = region.at(first), (last - first) * page
            # Counted before the ioctl: it wakes the faulting thread, which may read the stats
            # at once and must find its page counted.
            self._count(region, first, last, how)
            try:
                if how is Fill.COPY:
                    source.uffd.copy(address, src, length, wake=wake)
                elif how in (Fill.ZERO, Fill.KNOWN_ZERO):  # hugetlbfs ranges have no ZEROPAGE
                    source.uffd.copy(address, self.zeros(length), length)
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
                if source not in self.gone:
                    self.gone.append(source)
                return Outcome.PROCESS_GONE
            except UserfaultfdError as err:
                self._count(region, first, last, how, sign=-1)
                if err.errno == errno.ENOENT:
                    # Unmapped meanwhile (its UNMAP event follows): nothing there to settle.
                    region.settled[first:last] = b"\x01" * (last - first)
                    return Outcome.DONE
                if err.errno == errno.EFAULT and how is Fill.COPY:
                    self.stats.add(_stats.ERRORS)
                    message = (f"store {self.store!r}: its mapped bytes for 0x{address:x}+"
                               f"{length} cannot be read (the file shrank?)")  # fmt: skip
                    self.stats.note(message)
                    _log.warning("%s", message)
                    return Outcome.STORE_FAILED
                raise
            region.settled[first:last] = b"\x01" * (last - first)
            if how is Fill.COPY:
                self.stats.add(_stats.COPIES)
            return Outcome.DONE
        return Outcome.DONE

    def _place_paged(
        self, source: Source, region: RegionState, first: int, last: int, how: Fill, src: int,
        *, wake: bool,
    ) -> Outcome:  # fmt: skip
        """:meth:`place` for an out-of-core array: through its pager (see _pager)."""
        assert self.pager is not None
        try:
            if how is Fill.POISON:
                self.pager.poison(source, region, first, last)
                self._count(region, first, last, how)
                outcome = Outcome.DONE
            else:
                outcome, added = self.pager.install(
                    source, region, first, last, src if how is Fill.COPY else None, wake=wake
                )
                self._count(region, 0, added, how)
                if added and how is Fill.COPY:
                    self.stats.add(_stats.COPIES)
        except MappingChangedError:
            return Outcome.CHANGED
        except ProcessGoneError:
            if source not in self.gone:
                self.gone.append(source)
            return Outcome.PROCESS_GONE
        except UserfaultfdError as err:
            if err.errno not in (errno.ENOENT, errno.EEXIST):
                raise
            outcome = Outcome.DONE  # unmapped meanwhile, or poisoned already
        if outcome is Outcome.PROCESS_GONE and source not in self.gone:
            self.gone.append(source)
        if outcome is Outcome.DONE:
            region.settled[first:last] = (
                self.pager.present(region, first, last) if how is not Fill.POISON
                else b"\x01" * (last - first)
            )  # fmt: skip
        return outcome

    def _count(self, region: RegionState, first: int, last: int, how: Fill, sign: int = 1) -> None:
        pages = sign * max(0, last - first)
        if how is Fill.POISON:
            self.stats.add(_stats.POISONED, pages)
        elif how is Fill.COPY:
            self.stats.add(_stats.PAGES, pages)
            self.stats.add(_stats.BYTES, pages * region.page_size)
        elif how is Fill.KNOWN_ZERO:
            self.stats.add(_stats.ZEROS, pages)

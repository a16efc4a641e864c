"""Dirty-page tracking of this process's memory: which pages were written since the last look.

``track(region)`` returns a :class:`DirtyTracker`; ``tracker.dirty()`` lists the pages written
since the last call. :mod:`._delta` turns that into a base image plus small
deltas.

Design note: WP_ASYNC + PAGEMAP_SCAN
------------------------------------
The tracker write-protects its range with a userfaultfd created with WP_ASYNC (Linux 6.7). With
that feature the kernel resolves a write-protect fault by itself: it clears the page's uffd-wp bit
and lets the write go on. No event is queued, no handler exists, and a writer never blocks, so
unlike everything else in this package, tracked memory may be written from Python in the process
that tracks it (the GIL problem of the design note in ``_core`` cannot arise). WP_UNPOPULATED
(implied) puts a uffd-wp marker on pages never touched, so a first write to them counts too.

PAGEMAP_SCAN on /proc/self/pagemap reports the pages whose uffd-wp bit is gone (PAGE_IS_WRITTEN)
and, with PM_SCAN_WP_MATCHING, protects them again in the same page-table walk, under the page
table lock: a write either lands before the walk reaches its page (reported now) or after (it
faults and is reported next time). No write falls between "look" and "re-protect". One ioctl per
``dirty()``; the fd stays open and the result vector is sized for the worst case up to a cap.

Kernel writes count: read(2) into tracked memory takes the same async path (measured on 6.18), so
the uffd is created with UFFD_USER_MODE_ONLY, which only limits faults that would reach a handler,
and makes tracking work without CAP_SYS_PTRACE.

What the kernel reports besides writes (measured on Linux 6.18, asserted in
tests/tools/test_dirty.py):
- Anonymous memory: MADV_DONTNEED (of a written page, a clean one, one never touched, or a whole
  2 MiB page table) drops the page *and* its protection ("Zap on anonymous always means dropping
  everything", mm/memory.c). PAGEMAP_SCAN reports such a page as written until the next reset
  re-protects it. Its contents did change (it reads zeros now), so a delta that includes it is
  right. MADV_FREE and MADV_PAGEOUT keep the protection and are not reported.
- shmem (memfd): MADV_DONTNEED only unmaps; the data stays in the page cache, the kernel leaves a
  uffd-wp marker, nothing is reported. But fallocate(PUNCH_HOLE) and MADV_REMOVE, which *do* turn
  pages to zeros, are not reported either, and neither are writes through another mapping of the
  same memfd: tracking follows this mapping's page tables, not the file.

Scope: the memory of this process only. Tracking another process needs a uffd registered in its
address space (made there and handed over); out of scope here. A forked child does not inherit
the tracking (no EVENT_FORK: the kernel drops the registration in the child); the parent's goes on.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import time
from dataclasses import dataclass
from typing import Final, final

from .. import memory
from .._closing import Closing
from .._core import Userfaultfd
from .._errors import FeatureUnavailableError
from .._flags import Feature, Mode, PageCategory, ScanFlag
from .._scan import PageScanner

__all__ = ["DirtyStats", "DirtyTracker", "track"]

_FEATURES: Final = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP
_SCAN_RESET: Final = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC
# Most runs a vector holds (24 bytes each): the worst case of alternate pages up to 1 GiB of 4 KiB
# pages; a bigger, more scattered set takes one more ioctl per vector-full, nothing is lost.
_MAX_VECTOR_REGIONS: Final = 1 << 17


@final
@dataclass(frozen=True, slots=True)
class DirtyStats:
    """What a tracker has done: scans run, pages they reported, seconds spent in them."""

    scans: int
    pages: int
    seconds: float


@final
class DirtyTracker(Closing):
    """Pages of one range of this process written since the last reset. Make it with :func:`track`.

    ``page_size`` is the unit of the page indexes (the huge page size for hugetlbfs mappings).
    Closing the tracker (idempotent; also a context manager) lifts the protection.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        address: int,
        length: int,
        page_size: int,
        mapping: memory.Mapping | None,
    ) -> None:
        self._uffd = uffd
        self.address = address
        self.length = length
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1  # page sizes are powers of two
        self._mapping = mapping
        regions = min((length // page_size + 1) // 2 + 1, _MAX_VECTOR_REGIONS)
        self._scanner = PageScanner(regions)
        self._scans = 0
        self._pages = 0
        self._seconds = 0.0

    # -- the scan ----------------------------------------------------------------------------------
    def dirty_ranges(self, reset: bool = True) -> list[tuple[int, int]]:
        """Runs ``[first, end)`` of page indexes written since the last reset, in order.

        ``reset=True`` write-protects them again in the same walk (they are reported once);
        ``reset=False`` only looks, and the next call reports them again.
        """
        starts, ends, _pages = self._timed_scan(reset)
        base, shift = self.address, self._shift
        pairs = zip(starts, ends, strict=True)
        return [((s - base) >> shift, (e - base) >> shift) for s, e in pairs]

    def dirty(self, reset: bool = True) -> list[int]:
        """Sorted indexes of the pages written since the last reset (see :meth:`dirty_ranges`)."""
        starts, ends, pages = self._timed_scan(reset)
        base, shift = self.address, self._shift
        if pages == len(starts):  # every run is one page: the common case of scattered writes
            return [(s - base) >> shift for s in starts]
        firsts = [(s - base) >> shift for s in starts]
        lasts = [(e - base) >> shift for e in ends]
        return list(itertools.chain.from_iterable(map(range, firsts, lasts)))

    def _timed_scan(self, reset: bool) -> tuple[list[int], list[int], int]:
        started = time.perf_counter()
        starts, ends = self._scan(_SCAN_RESET if reset else ScanFlag.CHECK_WPASYNC)
        pages = (sum(ends) - sum(starts)) >> self._shift
        self._scans += 1
        self._pages += pages
        self._seconds += time.perf_counter() - started
        return starts, ends, pages

    def _scan(self, flags: ScanFlag) -> tuple[list[int], list[int]]:
        """The addresses where written runs start and end."""
        if self._uffd.closed:
            raise ValueError("this DirtyTracker is closed")
        scanner = self._scanner
        starts: list[int] = []
        ends: list[int] = []
        steps = scanner.walk(
            self.address, self.address + self.length, flags=flags,
            category_mask=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN,
            describe=_describe_scan,
        )  # fmt: skip
        for filled in steps:
            more_starts, more_ends = scanner.bounds(filled)
            if ends and more_starts and ends[-1] == more_starts[0]:  # split by a full vector
                ends[-1] = more_ends[0]
                del more_starts[0], more_ends[0]
            starts += more_starts
            ends += more_ends
        return starts, ends

    # -- state -------------------------------------------------------------------------------------
    def stats(self) -> DirtyStats:
        """Scans so far, pages they reported in total, and the seconds they took."""
        return DirtyStats(self._scans, self._pages, self._seconds)

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the tracked bytes (the Mapping's own ``view`` if given one)."""
        if self._mapping is not None:
            return self._mapping.view
        array_type = ctypes.c_char * self.length
        return memoryview(array_type.from_address(self.address)).cast("B")

    @property
    def closed(self) -> bool:
        return self._uffd.closed

    def close(self) -> None:
        """Stop tracking: the range is unregistered and writable without faults. Idempotent."""
        if self._uffd.closed:
            return
        self._uffd.close()
        self._scanner.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._scans} scans"
        return f"<DirtyTracker 0x{self.address:x}+{self.length:#x} {state}>"


def _describe_scan(code: int, start: int, end: int) -> str:
    where = f"PAGEMAP_SCAN on [0x{start:x}, 0x{end:x})"
    if code == errno.EPERM:
        return (
            f"{where}: part of the range is no longer registered for async write-protect "
            "(was it unmapped or remapped?)"
        )
    return f"{where}: {os.strerror(code)}"


def track(region: memory.Mapping | tuple[int, int]) -> DirtyTracker:
    """Start tracking writes to ``region`` of this process: a Mapping, or (address, length).

    Every page starts clean. Raises FeatureUnavailableError when the kernel lacks WP_ASYNC or
    PAGEMAP_SCAN (Linux 6.7), UserfaultfdError when the range cannot be registered.
    """
    if isinstance(region, memory.Mapping):
        address, length, unit = region.address, region.length, region.page_size
        mapping: memory.Mapping | None = region
    else:
        (address, length), unit, mapping = region, memory.page_size(), None
    if length <= 0 or address % unit or length % unit:
        raise ValueError(
            f"address 0x{address:x} and length {length} must be positive multiples of {unit}"
        )
    features = _FEATURES
    if mapping is None or mapping.kind is not memory.MappingKind.ANONYMOUS:
        # WP on shmem and hugetlbfs; for a bare range we do not know the backing, and the bit
        # costs nothing on anonymous memory (every kernel with WP_ASYNC and markers has it).
        features |= Feature.WP_HUGETLBFS_SHMEM
    try:
        uffd = Userfaultfd(features, user_mode_only=True)
    except FeatureUnavailableError as err:
        raise FeatureUnavailableError(
            err.errno if err.errno is not None else errno.EINVAL,
            "dirty tracking needs async write-protect (WP_ASYNC) and PAGEMAP_SCAN, Linux 6.7: "
            f"{err.strerror}",
        ) from err
    try:
        uffd.register(address, length, Mode.WP)
        uffd.writeprotect(address, length)
        return DirtyTracker(uffd, address, length, unit, mapping)
    except BaseException:
        uffd.close()
        raise

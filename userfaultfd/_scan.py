"""PAGEMAP_SCAN (Linux 6.7): the one page scanner, behind ``memory.pagemap_scan`` and the tracker.

One ioctl on /proc/PID/pagemap walks the page tables of a range and fills a vector with runs of
pages (``struct page_region``: start, end, categories) that match the category masks, optionally
write-protecting them in the same walk. When the vector fills up the kernel stops and reports
where (``walk_end``); :meth:`PageScanner.walk` goes on from there, so no run is lost however many
there are. The scanner keeps its pagemap descriptor and its vector between scans.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import final

from . import _abi
from ._buffer import pinned
from ._closing import Closing
from ._errors import call
from ._flags import PageCategory, ScanFlag

__all__ = ["ALL_CATEGORIES", "PageRegion", "PageScanner", "ScanResult"]

#: Every PAGE_IS_* category: report all of them.
ALL_CATEGORIES = PageCategory(0xFF)


@final
@dataclass(frozen=True, slots=True)
class PageRegion:
    """A run of pages [start, end) sharing ``categories``."""

    start: int
    end: int
    categories: PageCategory


@final
@dataclass(frozen=True, slots=True)
class ScanResult:
    """What PAGEMAP_SCAN found, and where its walk stopped (``walk_end`` < end: stopped early)."""

    regions: tuple[PageRegion, ...]
    walk_end: int


def _describe(code: int, start: int, end: int) -> str:
    return f"PAGEMAP_SCAN on [0x{start:x}, 0x{end:x}): {os.strerror(code)}"


class PageScanner(Closing):
    """PAGEMAP_SCAN on the pagemap of process ``pid``, into a vector of ``capacity`` runs."""

    def __init__(self, capacity: int, *, pid: int | str = "self", proc: str = "/proc") -> None:
        if capacity < 1:
            raise ValueError(f"a scan vector holds at least 1 region, not {capacity}")
        self.capacity = capacity
        #: Where the last ioctl's walk stopped.
        self.walk_end = 0
        self._vector = bytearray(capacity * _abi.PAGE_REGION.size)
        self._fd = os.open(f"{proc}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def walk(
        self,
        start: int,
        end: int,
        *,
        flags: ScanFlag = ScanFlag(0),
        category_mask: PageCategory = PageCategory(0),
        category_inverted: PageCategory = PageCategory(0),
        category_anyof_mask: PageCategory = PageCategory(0),
        return_mask: PageCategory = ALL_CATEGORIES,
        max_pages: int = 0,
        describe: Callable[[int, int, int], str] = _describe,
    ) -> Iterator[int]:
        """Scan [start, end), one ioctl per step; yields the runs each step put in the vector.

        Read them (:meth:`regions`, :meth:`bounds`) before the next step overwrites them. A full
        vector makes the walk go on where the kernel stopped, unless ``max_pages`` limits it.
        ``describe(errno, start, end)`` words the error of a failed step.
        """
        if self._fd < 0:
            raise ValueError("this PageScanner is closed")
        categories = (int(category_inverted), int(category_mask), int(category_anyof_mask),
                      int(return_mask))  # fmt: skip
        while True:
            filled = self._scan_once(start, end, int(flags), max_pages, categories, describe)
            yield filled
            if self.walk_end >= end or max_pages or filled < self.capacity:
                return
            start = self.walk_end  # the vector filled up: go on where the walk stopped

    def regions(self, filled: int) -> list[PageRegion]:
        """The first ``filled`` runs of the vector, as records."""
        unpack, size = _abi.PAGE_REGION.unpack_from, _abi.PAGE_REGION.size
        runs = (unpack(self._vector, i * size) for i in range(filled))
        return [PageRegion(s, e, PageCategory(cats)) for s, e, cats in runs]

    def bounds(self, filled: int) -> tuple[list[int], list[int]]:
        """Where the first ``filled`` runs start, and where they end, decoded in bulk.

        A page_region is three native u64s; slicing a ``Q`` view and ``tolist()`` run in C,
        where a Python loop per run would cost several times the ioctl.
        """
        with memoryview(self._vector).cast("Q") as fields:
            return fields[0 : 3 * filled : 3].tolist(), fields[1 : 3 * filled : 3].tolist()

    def _scan_once(
        self,
        start: int,
        end: int,
        flags: int,
        max_pages: int,
        categories: tuple[int, int, int, int],
        describe: Callable[[int, int, int], str],
    ) -> int:
        fd = self._fd
        with pinned(self._vector, writable=True) as (vector, _):
            arg = bytearray(
                _abi.PM_SCAN_ARG.pack(
                    _abi.PM_SCAN_ARG.size, flags, start, end, 0, vector, self.capacity,
                    max_pages, *categories,
                )
            )  # fmt: skip
            filled: int = call(
                lambda: fcntl.ioctl(fd, _abi.PAGEMAP_SCAN, arg, True),
                lambda code: describe(code, start, end),
            )
        self.walk_end = _abi.PM_SCAN_ARG.unpack(arg)[4]
        return filled

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the pagemap descriptor. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

"""CriuPages: one dumped task's address space as a Store, byte offset == virtual address."""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, final

from ..stores import Store, StoreError, open_store
from ._images import CriuImageError, Images, PagemapEntry, Vma

__all__ = ["CriuPages", "LazyRange"]

PAGE = 4096


@final
@dataclass(frozen=True, slots=True)
class LazyRange:
    """A piece of a lazily restored VMA: the unit the restore registers (runs of the pagemap
    are split here, since one UFFDIO_COPY cannot cross a VMA)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Tables:
    """Sorted run starts and (start, end, offset in the pages image) of every present run, the
    lazy VMAs, and where their pages come from."""

    starts: list[int]
    runs: list[tuple[int, int, int]]
    lazy_starts: list[int]
    lazy: list[LazyRange]


@final
class CriuPages(Store):
    """Task ``pid`` of the dump in ``images``: reading [offset, offset + n) reads the task's
    memory at those addresses as dumped. PRESENT pagemap runs come from the pages image
    (``pages``: a Store over its bytes, default ``pages-ID.img`` in ``images``; a URL or path
    template with ``{id}`` is opened with open_store, given ``storage_options``, e.g. S3's
    endpoint and keys); addresses inside a lazy VMA but outside
    the pagemap read zeros (:meth:`known_zero`); anything else is a StoreError, never zeros.

    An incremental dump (IN_PARENT runs in a lazy VMA) and a pages image shorter than the
    pagemap says are refused at once with a CriuImageError naming the file.
    """

    def __init__(
        self, images: Images | str | os.PathLike[str], pid: int, *,
        pages: Store | str | None = None, storage_options: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.images = images if isinstance(images, Images) else Images(images)
        self.pid = pid
        vmas = self.images.vmas(pid)
        self.pages_id, entries = self.images.pagemap(pid)
        self.vmas = vmas
        self._tables = _build(self.images, pid, vmas, entries)
        self._size = self._tables.lazy[-1].end if self._tables.lazy else 0
        needed = sum(end - start for start, end, _ in self._tables.runs)
        if isinstance(pages, Store):
            self._pages = pages
        else:
            where = self.images.pages_path(self.pages_id) if pages is None else pages
            where = where.replace("{id}", str(self.pages_id))
            try:
                self._pages = open_store(where, **dict(storage_options or {}))
            except FileNotFoundError:
                raise CriuImageError(f"{where}: missing (the pages of task {pid})") from None
        self._pages_name = getattr(self._pages, "path", None) or repr(self._pages)
        self._mapped: list[tuple[int, int, int]] | None = None
        self._mapped_known = False
        if self._pages.size < needed:
            name = self.images.pages_path(self.pages_id) if pages is None else str(pages)
            self._pages.close()
            raise CriuImageError(
                f"{name}: truncated: the pagemap of task {pid} needs {needed} bytes "
                f"({needed // PAGE} pages), the pages image holds {self._pages.size}"
            )

    @classmethod
    def _from(cls, other: CriuPages, pages: Store) -> CriuPages:
        self = cls.__new__(cls)
        self.images, self.pid, self.pages_id, self.vmas = (
            other.images, other.pid, other.pages_id, other.vmas
        )  # fmt: skip
        self._tables, self._size, self._pages = other._tables, other._size, pages
        self._pages_name = other._pages_name
        self._mapped, self._mapped_known = None, False
        return self

    @property
    def size(self) -> int:
        return self._size

    def lazy_ranges(self) -> list[LazyRange]:
        """The lazily restored VMAs, in address order."""
        return list(self._tables.lazy)

    def present_pages(self) -> int:
        """Pages of the lazy VMAs that the pages image holds (what a fill to the end copies;
        the rest of the lazy VMAs reads zeros)."""
        tables, pages = self._tables, 0
        for start, end, _ in tables.runs:
            i = max(0, bisect.bisect_right(tables.lazy_starts, start) - 1)
            while i < len(tables.lazy) and tables.lazy[i].start < end:
                lazy = tables.lazy[i]
                pages += max(0, min(end, lazy.end) - max(start, lazy.start)) // PAGE
                i += 1
        return pages

    def read_into(self, offset: int, buffer: memoryview) -> int:
        length = self.clamp(offset, len(buffer))
        end = offset + length
        at = offset
        tables = self._tables
        i = max(0, bisect.bisect_right(tables.starts, at) - 1)
        while at < end:
            run = tables.runs[i] if i < len(tables.runs) else None
            if run is not None and run[1] <= at:
                i += 1
                continue
            if run is not None and run[0] <= at:  # inside a present run
                stop = min(end, run[1])
                piece = buffer[at - offset : stop - offset]
                got = self._pages.read_into(run[2] + (at - run[0]), piece)
                if got != len(piece):
                    raise StoreError(
                        errno.EIO,
                        f"{self._pages_name}: short read at offset {run[2] + (at - run[0])} "
                        f"({got} of {len(piece)} bytes) for task {self.pid} at 0x{at:x}",
                    )
                at = stop
                continue
            stop = min(end, run[0]) if run is not None else end  # a gap: zeros, if lazy
            self._check_lazy(at, stop)
            buffer[at - offset : stop - offset] = bytes(stop - at)
            at = stop
        return length

    def _check_lazy(self, start: int, end: int) -> None:
        """StoreError unless [start, end) lies inside lazy VMAs (where a gap reads zeros)."""
        tables = self._tables
        at = start
        j = bisect.bisect_right(tables.lazy_starts, at) - 1
        while at < end:
            inside = 0 <= j < len(tables.lazy) and tables.lazy[j].start <= at < tables.lazy[j].end
            if not inside:
                raise StoreError(
                    errno.EFAULT,
                    f"task {self.pid}: 0x{at:x} is in no lazily restored VMA of "
                    f"{self.images.file(f'mm-{self.pid}.img')}: its bytes are unknown",
                )
            at = tables.lazy[j].end
            j += 1

    def address(self, offset: int, length: int) -> int | None:
        """Where [offset, offset + length) lies in the pages image's mapping, if it lies inside
        one present run and the image can map it (a local file: the handler then copies
        straight from there, not through a buffer)."""
        tables = self._tables
        at = bisect.bisect_right(tables.starts, offset) - 1
        if length <= 0 or at < 0:
            return None
        start, end, image_offset = tables.runs[at]
        if offset + length > end:
            return None
        return self._pages.address(image_offset + (offset - start), length)

    def mapped(self) -> list[tuple[int, int, int]] | None:
        """The present runs where the pages image is mapped (a local file), and the gaps of
        the lazy VMAs as zeros; None when the image is not mapped (a pack, a URL). Worked out
        once (a restored program may have tens of thousands of VMAs; the handler asks twice)."""
        if not self._mapped_known:
            self._mapped, self._mapped_known = self._map_runs(), True
        return self._mapped

    def _map_runs(self) -> list[tuple[int, int, int]] | None:
        image = self._pages.mapped()
        if image is None or len(image) != 1 or image[0][0] != 0:
            return None
        _, mapped_length, base = image[0]
        tables = self._tables
        runs: list[tuple[int, int, int]] = []
        for vma in tables.lazy:
            at = vma.start
            i = max(0, bisect.bisect_right(tables.starts, at) - 1)
            while at < vma.end:
                run = tables.runs[i] if i < len(tables.runs) else None
                if run is not None and run[1] <= at:
                    i += 1
                    continue
                if run is not None and run[0] <= at:  # a present run: from the image
                    stop = min(vma.end, run[1])
                    source = run[2] + (at - run[0])
                    if source + (stop - at) > mapped_length:
                        return None  # the image is shorter than the pagemap says
                    runs.append((at, stop - at, base + source))
                else:  # a gap of the lazy VMA: zeros
                    stop = min(vma.end, run[0]) if run is not None else vma.end
                    runs.append((at, stop - at, 0))
                at = stop
        return runs

    def known_zero(self, offset: int, length: int) -> bool:
        if length <= 0 or offset < 0 or offset + length > self._size:
            return False
        tables = self._tables
        i = bisect.bisect_right(tables.starts, offset + length - 1) - 1
        if i >= 0 and tables.runs[i][1] > offset:
            return False  # a present run overlaps
        try:
            self._check_lazy(offset, offset + length)
        except StoreError:
            return False
        return True

    def __enter__(self) -> CriuPages:
        return self

    def reopen(self) -> CriuPages:
        return CriuPages._from(self, self._pages.reopen())

    def close(self) -> None:
        self._pages.close()

    def __repr__(self) -> str:
        return f"CriuPages({self.images.path!r}, pid={self.pid}, pages={self._pages_name})"


def _build(images: Images, pid: int, vmas: list[Vma], entries: list[PagemapEntry]) -> _Tables:
    name = images.file(f"pagemap-{pid}.img")
    lazy: list[LazyRange] = [LazyRange(v.start, v.end) for v in vmas if v.lazy]
    lazy_starts = [r.start for r in lazy]
    starts: list[int] = []
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for index, e in enumerate(entries, start=1):
        end = e.vaddr + e.nr_pages * PAGE
        if e.in_parent:
            if any(r.start < end and e.vaddr < r.end for r in lazy):
                raise CriuImageError(
                    f"{name}: record {index}: {e.nr_pages} pages at 0x{e.vaddr:x} are in a "
                    "parent dump (an incremental dump, IN_PARENT): not supported; restore "
                    "from a full dump"
                )
            continue
        if not e.present:
            raise CriuImageError(
                f"{name}: record {index}: flags 0x{e.flags:x} at 0x{e.vaddr:x}: neither present "
                "nor in a parent dump"
            )
        starts.append(e.vaddr)
        runs.append((e.vaddr, end, offset))
        offset += e.nr_pages * PAGE
    return _Tables(starts, runs, lazy_starts, lazy)

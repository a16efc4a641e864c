"""Memory that userfaultfd can register, and what the page tables say about it.

userfaultfd registers three kinds of memory: anonymous, shmem (memfd, shared or private
mappings) and hugetlbfs. A regular file on a disk file system cannot be registered. Each maker
here returns a :class:`Mapping` that owns its pages and knows its address.

Reading the page tables: ``resident`` and ``write_protected`` read /proc/PID/pagemap (8 bytes a
page); ``pagemap_scan`` wraps the PAGEMAP_SCAN ioctl (Linux 6.7), which also write-protects what it
finds in the same walk, the basis of dirty tracking with WP_ASYNC.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from typing import final as _final

from . import _abi, _libc
from ._buffer import pinned as _pinned
from ._closing import Closing as _Closing
from ._flags import PageCategory as _PageCategory
from ._flags import ScanFlag as _ScanFlag
from ._scan import ALL_CATEGORIES as _ALL_CATEGORIES
from ._scan import PageRegion, ScanResult
from ._scan import PageScanner as _PageScanner

__all__ = [
    "Mapping",
    "MappingKind",
    "PageRegion",
    "ScanResult",
    "anonymous",
    "free_huge_pages",
    "huge_page_size",
    "huge_pages",
    "hugetlb",
    "memfd",
    "page_size",
    "pagemap_scan",
    "resident",
    "write_protected",
]

_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def page_size() -> int:
    """The base page size of this machine."""
    return os.sysconf("SC_PAGE_SIZE")


def huge_page_size(*, proc: str = "/proc") -> int:
    """The default huge page size (hugetlbfs), from /proc/meminfo."""
    kib = _meminfo("Hugepagesize", proc)
    if kib is None:
        raise OSError(errno.ENOENT, "this kernel reports no Hugepagesize in /proc/meminfo")
    return kib * 1024


def free_huge_pages(*, proc: str = "/proc") -> int:
    """How many default-size huge pages are free in the pool right now."""
    return _meminfo("HugePages_Free", proc) or 0


def _meminfo(field: str, proc: str) -> int | None:
    """The number on the ``field:`` line of /proc/meminfo (sizes are in KiB), or None."""
    prefix = f"{field}:"
    with open(f"{proc}/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(prefix):
                return int(line.split()[1])
    return None


class MappingKind(enum.StrEnum):
    """What backs a :class:`Mapping`. A ``str``: it compares equal to its value."""

    #: Private anonymous memory (MAP_ANONYMOUS).
    ANONYMOUS = "anonymous"
    #: shmem: a memfd (or tmpfs file), mapped shared or private.
    SHMEM = "shmem"
    #: hugetlbfs: anonymous MAP_HUGETLB memory or a MFD_HUGETLB memfd, in huge pages.
    HUGETLBFS = "hugetlbfs"
    #: A regular file on a disk file system (userfaultfd cannot register it).
    FILE = "file"

    @classmethod
    def _missing_(cls, value: object) -> MappingKind | None:
        # memory.hugetlb() used to say "hugetlb"; the old spelling still names the same kind.
        return cls.HUGETLBFS if value == "hugetlb" else None


@_final
class Mapping(_Closing):
    """A mapping this process owns: ``address``, ``length``, a writable ``view`` of its bytes.

    ``kind`` says what backs it, ``page_size`` is its unit (a huge page for hugetlbfs), ``fd`` is
    the memfd behind a memfd mapping (None for anonymous memory). Close it, or use it as a
    context manager; close fails with BufferError while a view of it (a NumPy array from
    :meth:`numpy`, a memoryview taken from :attr:`view`) is still alive.
    """

    def __init__(
        self,
        mm: mmap.mmap,
        length: int,
        *,
        kind: MappingKind | str,
        fd: int | None = None,
        owns_fd: bool = False,
    ) -> None:
        self._mmap = mm
        with _pinned(mm, writable=True) as (address, _size):
            self.address: int = address
        self.length = length
        self.kind = MappingKind(kind)
        self.fd = fd
        self._owns_fd = owns_fd
        self.view: memoryview = memoryview(mm)

    @property
    def page_size(self) -> int:
        """The page size of this memory: the huge page size for hugetlbfs, else the base page."""
        return huge_page_size() if self.kind is MappingKind.HUGETLBFS else page_size()

    def alias(self, *, shared: bool = True) -> Mapping:
        """A second mapping of the same memfd: writes through it reach the same page cache.

        A MINOR-mode server fills or edits pages through an alias, then CONTINUEs them in the
        registered mapping.
        """
        if self.fd is None:
            raise ValueError("alias() needs a memfd-backed mapping; this one is anonymous")
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        mm = mmap.mmap(self.fd, self.length, flags=flags, prot=_PROT_RW)
        return Mapping(mm, self.length, kind=self.kind, fd=self.fd)

    def numpy(self, dtype: Any = "uint8") -> Any:
        """A NumPy array over this memory (needs NumPy)."""
        import numpy as np

        return np.frombuffer(self._mmap, dtype=dtype)

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) on part of the mapping, e.g. ``mmap.MADV_DONTNEED``."""
        size = self.length - offset if length is None else length
        self._mmap.madvise(advice, offset, size)

    def punch_hole(self, offset: int, length: int) -> None:
        """Drop [offset, offset+length) of the memfd from the page cache (fallocate PUNCH_HOLE)."""
        if self.fd is None:
            raise ValueError("punch_hole() needs a memfd-backed mapping; this one is anonymous")
        mode = _abi.FALLOC_FL_PUNCH_HOLE | _abi.FALLOC_FL_KEEP_SIZE
        where = f"fallocate(PUNCH_HOLE) at {offset}+{length}"
        describe = lambda code: f"{where}: {os.strerror(code)}"  # noqa: E731
        _libc.fallocate(self.fd, mode, offset, length, describe=describe)

    @property
    def closed(self) -> bool:
        return self._mmap.closed

    def close(self) -> None:
        """Unmap (and close the memfd this mapping owns). Idempotent."""
        if self._mmap.closed:
            return
        self.view.release()
        self._mmap.close()
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"<Mapping {self.kind} 0x{self.address:x}+{self.length:#x}>"


def _check_length(length: int, unit: int, what: str) -> None:
    if length <= 0 or length % unit:
        raise ValueError(f"{what} length must be a positive multiple of {unit}, not {length}")


def _map(make: Any, what: str) -> mmap.mmap:
    try:
        mm: mmap.mmap = make()
    except OSError as err:
        if err.errno == errno.ENOMEM and "huge" in what:
            raise OSError(
                errno.ENOMEM,
                f"no free huge pages for this {what}: reserve some with "
                "/proc/sys/vm/nr_hugepages (or userfaultfd.memory.huge_pages(n))",
            ) from err
        raise
    return mm


def anonymous(length: int, *, noreserve: bool = False) -> Mapping:
    """Private anonymous memory, the kind MISSING, WP and MOVE work on without any feature.

    ``noreserve`` (MAP_NORESERVE): reserve no swap or commit charge up front, so a mapping may
    be larger than memory; pages are charged as they are filled.
    """
    _check_length(length, page_size(), "anonymous mapping")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_abi.MAP_NORESERVE if noreserve else 0)
    mm = _map(lambda: mmap.mmap(-1, length, flags=flags, prot=_PROT_RW), "anonymous mapping")
    return Mapping(mm, length, kind=MappingKind.ANONYMOUS)


def hugetlb(length: int) -> Mapping:
    """Private anonymous memory backed by huge pages (hugetlbfs); needs reserved huge pages."""
    _check_length(length, huge_page_size(), "hugetlb mapping")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _abi.MAP_HUGETLB
    mm = _map(lambda: mmap.mmap(-1, length, flags=flags, prot=_PROT_RW), "huge page mapping")
    return Mapping(mm, length, kind=MappingKind.HUGETLBFS)


def memfd(
    length: int, *, hugetlb: bool = False, shared: bool = True, name: str = "userfaultfd"
) -> Mapping:
    """A memfd (shmem, or hugetlbfs with ``hugetlb=True``) of ``length`` bytes, mapped once.

    ``shared=False`` maps it MAP_PRIVATE: reads come from the memfd's page cache, writes make
    private copies. ``alias()`` maps it again.
    """
    unit = huge_page_size() if hugetlb else page_size()
    _check_length(length, unit, "memfd")
    fd = os.memfd_create(name, _abi.MFD_CLOEXEC | (_abi.MFD_HUGETLB if hugetlb else 0))
    try:
        os.ftruncate(fd, length)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        what = "huge page memfd" if hugetlb else "memfd"
        mm = _map(lambda: mmap.mmap(fd, length, flags=flags, prot=_PROT_RW), what)
    except BaseException:
        os.close(fd)
        raise
    kind = MappingKind.HUGETLBFS if hugetlb else MappingKind.SHMEM
    return Mapping(mm, length, kind=kind, fd=fd, owns_fd=True)


@contextmanager
def huge_pages(count: int, *, proc: str = "/proc") -> Iterator[int]:
    """Make sure ``count`` default-size huge pages are free while the block runs (needs root).

    Raises the pool (vm.nr_hugepages) by what is missing and puts the old value back after;
    yields the number of free huge pages. Raises OSError if the kernel could not find the memory.
    """
    path = f"{proc}/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())
    free = free_huge_pages(proc=proc)
    if free < count:
        with open(path, "w") as f:
            f.write(str(before + count - free))
    try:
        free = free_huge_pages(proc=proc)
        if free < count:
            raise OSError(
                errno.ENOMEM, f"asked for {count} free huge pages, the kernel found {free}"
            )
        yield free
    finally:
        with open(path, "w") as f:
            f.write(str(before))


def _pagemap_entries(addr: int, length: int, pid: int | str, proc: str) -> list[int]:
    unit = page_size()
    first, last = addr // unit, (addr + length - 1) // unit
    count = last - first + 1
    entry = _abi.PAGEMAP_ENTRY.size
    fd = os.open(f"{proc}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, count * entry, first * entry)
    finally:
        os.close(fd)
    return [value for (value,) in _abi.PAGEMAP_ENTRY.iter_unpack(data)]


def resident(addr: int, length: int, *, pid: int | str = "self", proc: str = "/proc") -> list[bool]:
    """For each page of [addr, addr+length): is it mapped (present) in the page table?"""
    return [bool(e & _abi.PM_PRESENT) for e in _pagemap_entries(addr, length, pid, proc)]


def write_protected(
    addr: int, length: int, *, pid: int | str = "self", proc: str = "/proc"
) -> list[bool]:
    """For each page of [addr, addr+length): does its page table entry carry uffd-wp?"""
    return [bool(e & _abi.PM_UFFD_WP) for e in _pagemap_entries(addr, length, pid, proc)]


def pagemap_scan(
    addr: int,
    length: int,
    *,
    category_mask: _PageCategory = _PageCategory(0),
    category_inverted: _PageCategory = _PageCategory(0),
    category_anyof_mask: _PageCategory = _PageCategory(0),
    return_mask: _PageCategory = _ALL_CATEGORIES,
    flags: _ScanFlag = _ScanFlag(0),
    max_pages: int = 0,
    max_regions: int = 1024,
    pid: int | str = "self",
    proc: str = "/proc",
) -> ScanResult:
    """Run PAGEMAP_SCAN over [addr, addr+length) of process ``pid``.

    A page matches when all ``category_mask`` categories hold (each flipped by
    ``category_inverted``) and, if given, any of ``category_anyof_mask`` does. Matching pages are
    reported in runs, with their categories limited to ``return_mask``; ``WP_MATCHING``
    write-protects them in the same walk. The walk stops after ``max_pages`` pages (0: no limit);
    without a limit, it is repeated until the whole range is covered, however many runs there are.
    """
    unit = page_size()
    if length <= 0 or addr % unit or length % unit:
        raise ValueError(f"address 0x{addr:x} and length {length} must be positive page multiples")
    if max_regions < 1:
        raise ValueError(f"max_regions must be at least 1, not {max_regions}")
    regions: list[PageRegion] = []
    with _PageScanner(max_regions, pid=pid, proc=proc) as scanner:
        steps = scanner.walk(
            addr, addr + length, flags=flags, category_mask=category_mask,
            category_inverted=category_inverted, category_anyof_mask=category_anyof_mask,
            return_mask=return_mask, max_pages=max_pages,
        )  # fmt: skip
        for filled in steps:
            regions += scanner.regions(filled)
        return ScanResult(tuple(regions), scanner.walk_end)

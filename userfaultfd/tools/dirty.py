"""Dirty-page tracking of this process's memory, and incremental snapshots built on it.

``track(region)`` returns a :class:`DirtyTracker`; ``tracker.dirty()`` lists the pages written
since the last call. ``snapshot_full``, ``snapshot_delta`` and ``restore`` turn that into a base
image plus small deltas.

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

import array
import ctypes
import errno
import hashlib
import io
import itertools
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Final

from .. import _abi, memory
from .._closing import Closing
from .._core import Userfaultfd
from .._errors import FeatureUnavailableError
from .._flags import Feature, Mode

__all__ = [
    "DeltaInfo",
    "DirtyStats",
    "DirtyTracker",
    "restore",
    "snapshot_delta",
    "snapshot_full",
    "track",
]

_FEATURES: Final = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP
_SCAN_RESET: Final = _abi.PM_SCAN_WP_MATCHING | _abi.PM_SCAN_CHECK_WPASYNC
# Most runs a vector holds (24 bytes each): the worst case of alternate pages up to 1 GiB of 4 KiB
# pages; a bigger, more scattered set takes one more ioctl per vector-full, nothing is lost.
_MAX_VECTOR_REGIONS: Final = 1 << 17
_CHUNK: Final = 64 << 20  # bytes per read/write syscall when copying whole images

#: Delta file layout, little-endian: magic, page size, region length, page count (the header),
#: then ``count`` u64 page indexes in increasing order, then ``count`` pages, then a 16-byte
#: BLAKE2b digest of everything before it.
_DELTA_MAGIC: Final = b"UFFDDLT1"
_DELTA_HEADER: Final = struct.Struct("<8sQQQ")
_DIGEST_SIZE: Final = 16


@dataclass(frozen=True, slots=True)
class DirtyStats:
    """What a tracker has done: scans run, pages they reported, seconds spent in them."""

    scans: int
    pages: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DeltaInfo:
    """One delta written: pages in it, bytes of the file, seconds it took (scan and copy)."""

    pages: int
    bytes: int
    seconds: float


class DirtyTracker(Closing):
    """Pages of one range of this process written since the last reset. Make it with :func:`track`.

    ``page_size`` is the unit of the page indexes (the huge page size for hugetlb mappings).
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
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        regions = min((length // page_size + 1) // 2 + 1, _MAX_VECTOR_REGIONS)
        self._vector = bytearray(regions * _abi.PAGE_REGION.size)
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
        starts, ends = self._scan(_SCAN_RESET if reset else _abi.PM_SCAN_CHECK_WPASYNC)
        pages = (sum(ends) - sum(starts)) >> self._shift
        self._scans += 1
        self._pages += pages
        self._seconds += time.perf_counter() - started
        return starts, ends, pages

    def _scan(self, flags: int) -> tuple[list[int], list[int]]:
        """The addresses where written runs start and end."""
        if self._uffd.closed:
            raise ValueError("this DirtyTracker is closed")
        written = _abi.PAGE_IS_WRITTEN
        end = self.address + self.length
        vector = self._vector
        capacity = len(vector) // _abi.PAGE_REGION.size
        starts: list[int] = []
        ends: list[int] = []
        start = self.address
        while start < end:
            filled, walk_end = self._scan_once(vector, capacity, start, end, flags, written)
            # Decode in bulk: a page_region is (start, end, categories), native u64s; tolist()
            # runs in C, where a per-run Python loop would cost several times the ioctl.
            with memoryview(vector).cast("Q") as fields:
                more_starts = fields[0 : 3 * filled : 3].tolist()
                more_ends = fields[1 : 3 * filled : 3].tolist()
            if ends and more_starts and ends[-1] == more_starts[0]:  # split by a full vector
                ends[-1] = more_ends[0]
                del more_starts[0], more_ends[0]
            starts += more_starts
            ends += more_ends
            if filled < capacity:
                break
            start = walk_end  # the vector filled up: the kernel stopped (and protected) there
        return starts, ends

    def _scan_once(
        self, vector: bytearray, capacity: int, start: int, end: int, flags: int, written: int
    ) -> tuple[int, int]:
        assert capacity == len(vector) // _abi.PAGE_REGION.size
        return memory._scan_once(
            self._pagemap, vector, start, end, flags, 0, (0, written, 0, written),
            lambda code: _describe_scan(code, start, end),
        )  # fmt: skip

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
        os.close(self._pagemap)

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
        address, length, kind = region.address, region.length, region.kind
        mapping: memory.Mapping | None = region
    else:
        (address, length), kind, mapping = region, None, None
    huge = kind in ("hugetlb", "hugetlbfs")
    unit = memory.huge_page_size() if huge else memory.page_size()
    if length <= 0 or address % unit or length % unit:
        raise ValueError(
            f"address 0x{address:x} and length {length} must be positive multiples of {unit}"
        )
    features = _FEATURES
    if kind != "anonymous":
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


# -- snapshots -------------------------------------------------------------------------------------
def snapshot_full(source: DirtyTracker | memory.Mapping, path: str | os.PathLike[str]) -> None:
    """Write the whole region to ``path``: a raw image of exactly ``length`` bytes.

    Given a tracker, its dirty set is cleared first, then the memory is copied: a write during the
    copy may be in the image and is also reported next time, so deltas on top stay right. The file
    appears under its name only once complete.
    """
    if isinstance(source, DirtyTracker):
        source.dirty_ranges(reset=True)
    view = source.view
    with _atomic(path) as out:
        for offset in range(0, len(view), _CHUNK):
            with view[offset : offset + _CHUNK] as chunk:
                out.write(chunk)


def snapshot_delta(tracker: DirtyTracker, path: str | os.PathLike[str]) -> DeltaInfo:
    """Write the pages written since the last snapshot (or reset) to ``path`` as a delta file.

    The pages are copied after the scan that re-protects them, so a page written during the
    copy is reported again by the next delta. Format: see ``_DELTA_MAGIC``.
    """
    started = time.perf_counter()
    runs = tracker.dirty_ranges(reset=True)
    count = sum(end - first for first, end in runs)
    unit = tracker.page_size
    indexes = array.array("Q", (page for first, end in runs for page in range(first, end)))
    if sys.byteorder == "big":
        indexes.byteswap()  # the file is little-endian
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    size = 0
    view = tracker.view
    with _atomic(path) as out:

        def emit(data: bytes | memoryview) -> None:
            nonlocal size
            out.write(data)
            digest.update(data)
            size += len(data)

        emit(_DELTA_HEADER.pack(_DELTA_MAGIC, unit, tracker.length, count))
        emit(indexes.tobytes())
        for first, end in runs:
            with view[first * unit : end * unit] as pages:
                emit(pages)
        out.write(digest.digest())
    return DeltaInfo(count, size + _DIGEST_SIZE, time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class _Delta:
    path: str
    page_size: int
    runs: list[tuple[int, int]]
    data_offset: int


def restore(
    base_path: str | os.PathLike[str],
    delta_paths: Sequence[str | os.PathLike[str]] = (),
    *,
    into: memory.Mapping | None = None,
) -> memory.Mapping:
    """The memory a base image and deltas describe: the base, then each delta in order.

    Returns ``into`` (which must be as long as the base) or a fresh anonymous mapping. Every delta
    is checked before any is applied: a wrong magic, checksum, region length or page size (all
    deltas of a chain share one) raises ValueError naming the file.
    """
    length = os.path.getsize(base_path)
    unit = memory.page_size()
    if length <= 0 or length % unit:
        raise ValueError(
            f"{os.fspath(base_path)}: a base image of {length} bytes is not whole pages"
        )
    if into is not None and into.length != length:
        raise ValueError(f"into is {into.length} bytes long, the base image {length}")
    deltas: list[_Delta] = []
    for delta_path in delta_paths:
        delta = _check_delta(os.fspath(delta_path), length)
        if deltas and delta.page_size != deltas[0].page_size:
            raise ValueError(
                f"{delta.path}: page size {delta.page_size} differs from the chain's "
                f"{deltas[0].page_size} ({deltas[0].path}); it belongs to another region"
            )
        deltas.append(delta)
    target = memory.anonymous(length) if into is None else into
    try:
        view = target.view
        with open(base_path, "rb", buffering=0) as base:
            _read_exactly(base, view, 0, length, os.fspath(base_path))
        for delta in deltas:
            with open(delta.path, "rb", buffering=0) as f:
                f.seek(delta.data_offset)
                for first, end in delta.runs:
                    _read_exactly(
                        f, view, first * delta.page_size, end * delta.page_size, delta.path
                    )
    except BaseException:
        if into is None:
            target.close()
        raise
    return target


def _check_delta(path: str, length: int) -> _Delta:
    """Validate one delta file (checksum first, then header and indexes); its page runs."""
    size = os.path.getsize(path)
    if size < _DELTA_HEADER.size + _DIGEST_SIZE:
        raise ValueError(f"{path}: {size} bytes is too short for a delta")
    digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    with open(path, "rb") as f:
        remaining = size - _DIGEST_SIZE
        while remaining:
            block = f.read(min(remaining, 1 << 20))
            if not block:
                raise ValueError(f"{path}: truncated while reading")
            digest.update(block)
            remaining -= len(block)
        if f.read() != digest.digest():
            raise ValueError(f"{path}: checksum mismatch: the delta is corrupt or truncated")
        f.seek(0)
        magic, unit, region, count = _DELTA_HEADER.unpack(f.read(_DELTA_HEADER.size))
        if magic != _DELTA_MAGIC:
            raise ValueError(f"{path}: not a delta file (magic {magic!r}, want {_DELTA_MAGIC!r})")
        if region != length:
            raise ValueError(
                f"{path}: a delta of a {region}-byte region cannot apply to a {length}-byte base"
            )
        if unit <= 0 or length % unit:
            raise ValueError(f"{path}: page size {unit} does not divide the region ({length})")
        if size != _DELTA_HEADER.size + count * (8 + unit) + _DIGEST_SIZE:
            raise ValueError(f"{path}: {size} bytes does not match {count} pages of {unit}")
        indexes = array.array("Q")
        indexes.frombytes(f.read(count * 8))
    if sys.byteorder == "big":
        indexes.byteswap()
    runs = _runs(indexes, length // unit, path)
    return _Delta(path, unit, runs, _DELTA_HEADER.size + count * 8)


def _runs(indexes: Iterable[int], pages: int, path: str) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    previous = -1
    for index in indexes:
        if not previous < index < pages:
            raise ValueError(f"{path}: page index {index} out of order or past {pages} pages")
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
        previous = index
    return runs


def _read_exactly(
    f: io.RawIOBase | io.BufferedReader, view: memoryview, start: int, end: int, path: str
) -> None:
    while start < end:
        with view[start : min(end, start + _CHUNK)] as chunk:
            got = f.readinto(chunk)
        if not got:
            raise ValueError(f"{path}: ended early, {end - start} bytes short")
        start += got


@contextmanager
def _atomic(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write to a temporary name beside ``path``; rename over ``path`` only on success."""
    final = os.fspath(path)
    temporary = f"{final}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as out:
            yield out
    except BaseException:
        os.unlink(temporary)
        raise
    os.replace(temporary, final)

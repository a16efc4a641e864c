"""Incremental snapshots of tracked memory: a raw base image, delta files, and restore.

``snapshot_full(tracker, path)`` writes the whole region, ``snapshot_delta(tracker, path)`` the
pages written since the last snapshot (from :class:`~userfaultfd.tools.DirtyTracker`), and
``restore(base, deltas)`` rebuilds the memory: the base, then each delta in order. Every file is
written under a temporary name and renamed once complete; every delta is checked (magic, length,
page size, checksum) before any is applied.
"""

from __future__ import annotations

import array
import hashlib
import io
import os
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, final

from .. import memory
from .._replacing import replacing
from ._dirty import DirtyTracker

__all__ = ["DeltaInfo", "restore", "snapshot_delta", "snapshot_full"]

_CHUNK: Final = 64 << 20  # bytes per read/write syscall when copying whole images

#: Delta file layout, little-endian: magic, page size, region length, page count (the header),
#: then ``count`` u64 page indexes in increasing order, then ``count`` pages, then a 16-byte
#: BLAKE2b digest of everything before it.
_DELTA_MAGIC: Final = b"UFFDDLT1"
_DELTA_HEADER: Final = struct.Struct("<8sQQQ")
_DIGEST_SIZE: Final = 16


@final
@dataclass(frozen=True, slots=True)
class DeltaInfo:
    """One delta written: pages in it, bytes of the file, seconds it took (scan and copy)."""

    pages: int
    bytes: int
    seconds: float


def snapshot_full(source: DirtyTracker | memory.Mapping, path: str | os.PathLike[str]) -> None:
    """Write the whole region to ``path``: a raw image of exactly ``length`` bytes.

    Given a tracker, its dirty set is cleared first, then the memory is copied: a write during the
    copy may be in the image and is also reported next time, so deltas on top stay right. The file
    appears under its name only once complete.
    """
    if isinstance(source, DirtyTracker):
        source.dirty_ranges(reset=True)
    view = source.view
    with replacing(path) as out:
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
    with replacing(path) as out:

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

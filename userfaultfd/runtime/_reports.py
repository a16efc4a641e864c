"""What a handler tells its supervisor, so a restarted handler starts from where things are.

Every source (the program's uffd, and one per forked child) has a key the supervisor knows it
by. A handler reports each change to a source's map of ranges, each child it adopts (with the
child's uffd, over SCM_RIGHTS: the supervisor must hold a descriptor of every uffd, or a
handler's death would close the child's last one), and each source it has closed.

Nothing whose size grows with the number of ranges goes in a message itself: a SOCK_SEQPACKET
message must fit the socket's send buffer (net.core.wmem_default, 208 KiB here: about 7,000
ranges as a pickled list) or send() fails with EMSGSIZE. The program's ranges reach the
supervisor as a table in a memfd (:func:`table_fd`, :func:`read_table`), and a report larger
than :data:`INLINE` goes as a :class:`Spilled` message with its pickle in a memfd
(:meth:`Reporter.send`, :func:`receive`).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import pickle
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from .._events import Remap, Remove, Unmap
from .._forked import Channel
from ._ranges import RegionState

__all__ = [
    "INLINE",
    "Adopted",
    "Changed",
    "Closed",
    "Report",
    "Reporter",
    "Spilled",
    "pack_ranges",
    "read_table",
    "receive",
    "table_fd",
    "unpack_ranges",
]

#: The largest pickled report sent in the message itself; a larger one is spilled to a memfd.
INLINE = 64 << 10
#: One range of the program's table: address, length, store offset, page size (native u64s).
_ROW = struct.Struct("=QQQQ")
assert array.array("Q").itemsize == 8
#: pack_ranges: the count, then a row per range (address, length, offset, page size, stream).
_COUNT = struct.Struct("=Q")
_STATE = struct.Struct("=QQQQQ")


@dataclass(frozen=True, slots=True)
class Changed:
    """Source ``key``'s ranges changed (the event the handler read and applied)."""

    key: int
    event: Remove | Unmap | Remap


@dataclass(frozen=True, slots=True)
class Adopted:
    """A FORK event of source ``parent``: the child's uffd (sent with the report) is ``key``,
    and ``ranges`` (see :func:`pack_ranges`) are its ranges as they were at the fork."""

    parent: int
    key: int
    ranges: bytes


def pack_ranges(regions: list[RegionState]) -> bytes:
    """Ranges in a few bytes: what a restart needs (no page known filled, the removed pages),
    compressed (the per-page maps are mostly zeros). A row per range (address, length, store
    offset, page size, stream), then every range's removed map: about 1 µs a range, where a
    pickle of the records took 13."""
    rows = bytearray(_STATE.size * len(regions))
    for index, r in enumerate(regions):
        _STATE.pack_into(rows, index * _STATE.size, r.address, r.length, r.offset, r.page_size,
                         r.stream)  # fmt: skip
    removed = b"".join(r.removed for r in regions)
    return zlib.compress(_COUNT.pack(len(regions)) + rows + removed)


def unpack_ranges(data: bytes) -> list[RegionState]:
    raw = zlib.decompress(data)
    (count,) = _COUNT.unpack_from(raw)
    at = _COUNT.size + count * _STATE.size
    regions: list[RegionState] = []
    for address, length, offset, page_size, stream in _STATE.iter_unpack(raw[_COUNT.size : at]):
        pages = length // page_size
        regions.append(RegionState(address, length, offset, page_size, stream,
                                   bytearray(pages), bytearray(raw[at : at + pages])))  # fmt: skip
        at += pages
    if at != len(raw):
        raise ValueError(f"packed ranges: {len(raw) - at} bytes past the last range's map")
    return regions


@dataclass(frozen=True, slots=True)
class Closed:
    """Source ``key`` is settled or its process is gone: the supervisor may close its copy."""

    key: int


@dataclass(frozen=True, slots=True)
class Spilled:
    """A report too large for one message: its pickle (``size`` bytes) is in the memfd sent as
    the first descriptor, and the report's own descriptors follow."""

    size: int


Report = Changed | Adopted | Closed


def _memfd(name: str, data: bytes) -> int:
    """A memfd holding ``data``, read from its start."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int, size: int, what: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            raise EOFError(f"{what}: {len(data)} of {size} bytes in its memfd")
        data += chunk
    return bytes(data)


def table_fd(ranges: Iterable[tuple[int, int, int, int]]) -> tuple[int, int]:
    """The ranges (address, length, store offset, page size) as a memfd to send with the first
    message; returns the descriptor (the caller closes it) and the number of ranges."""
    table = array.array("Q", itertools.chain.from_iterable(ranges))  # native u64, as _ROW
    if len(table) % 4:
        raise ValueError("each range is (address, length, store offset, page size)")
    return _memfd("userfaultfd-ranges", table.tobytes()), len(table) // 4


def read_table(fd: int, count: int) -> list[tuple[int, int, int, int]]:
    """The ``count`` ranges :func:`table_fd` wrote to ``fd`` (which stays open)."""
    table = array.array("Q", _read_all(fd, count * _ROW.size, "the table of ranges"))
    return list(zip(table[0::4], table[1::4], table[2::4], table[3::4], strict=True))


def receive(channel: Channel, timeout: float) -> tuple[Report, list[int]]:
    """The next report and its descriptors (a :class:`Spilled` one read back from its memfd)."""
    report, fds = channel.recv(timeout=timeout)
    if isinstance(report, Spilled):
        if not fds:
            raise EOFError("a spilled report came without its memfd")
        spill, fds = fds[0], fds[1:]
        try:
            report = pickle.loads(_read_all(spill, report.size, "a spilled report"))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            os.close(spill)
    return report, fds


class Reporter:
    """The handler's end of the report channel. Once the supervisor is gone (the channel
    breaks), reports are dropped: there is nobody left to restart a handler."""

    def __init__(self, channel: Channel | None) -> None:
        self._channel = channel

    @property
    def supervised(self) -> bool:
        return self._channel is not None

    def send(self, report: Report, fds: list[int] | None = None) -> None:
        if self._channel is None:
            return
        spill = -1
        try:
            # Only an adoption grows with the ranges; the other reports are a few dozen bytes.
            if isinstance(report, Adopted) and len(report.ranges) > INLINE:
                data = pickle.dumps(report)
                spill = _memfd("userfaultfd-report", data)
                self._channel.send(Spilled(len(data)), [spill, *(fds or [])])
            else:
                self._channel.send(report, fds or [])
        except OSError:  # EPIPE, ECONNRESET: the supervisor died
            self.orphaned()
        finally:
            if spill >= 0:
                os.close(spill)

    def orphaned(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.sock.close()
            self._channel = None

"""What a handler tells its supervisor, so a restarted handler starts from where things are.

Every source (the program's uffd, and one per forked child) has a key the supervisor knows it
by. A handler reports each change to a source's map of ranges, each child it adopts (with the
child's uffd, over SCM_RIGHTS: the supervisor must hold a descriptor of every uffd, or a
handler's death would close the child's last one), and each source it has closed.
"""

from __future__ import annotations

import contextlib
import pickle
import zlib
from dataclasses import dataclass

from .._events import Remap, Remove, Unmap
from .._forked import Channel
from ._ranges import RegionState

__all__ = ["Adopted", "Changed", "Closed", "Report", "Reporter", "pack_ranges", "unpack_ranges"]


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
    """Ranges in a few bytes: what a restart needs (no page known filled), compressed (the
    per-page maps are mostly zeros, and a report must fit one message)."""
    return zlib.compress(pickle.dumps([r.forgotten() for r in regions]))


def unpack_ranges(data: bytes) -> list[RegionState]:
    regions: list[RegionState] = pickle.loads(zlib.decompress(data))
    return regions


@dataclass(frozen=True, slots=True)
class Closed:
    """Source ``key`` is settled or its process is gone: the supervisor may close its copy."""

    key: int


Report = Changed | Adopted | Closed


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
        try:
            self._channel.send(report, fds or [])
        except OSError:  # EPIPE, ECONNRESET: the supervisor died
            self.orphaned()

    def orphaned(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.sock.close()
            self._channel = None

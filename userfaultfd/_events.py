"""Events read from a userfaultfd, as frozen records made by a pure parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from . import _abi
from ._flags import FaultFlag

__all__ = ["Event", "Fork", "PageFault", "Remap", "Remove", "Unmap", "parse_events"]


@final
@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread faulted on a registered page and waits until the handler resolves it."""

    #: Faulting address: page-aligned unless EXACT_ADDRESS was enabled.
    address: int
    #: WRITE, WP and MINOR bits saying why.
    flags: FaultFlag
    #: The faulting thread's id with THREAD_ID enabled, else 0.
    thread_id: int


@final
@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked; ``uffd`` is a new descriptor, in the reader's process, for the child."""

    uffd: int


@final
@dataclass(frozen=True, slots=True)
class Remap:
    """mremap() moved ``length`` bytes of registered memory from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@final
@dataclass(frozen=True, slots=True)
class Remove:
    """[start, end) was dropped (MADV_DONTNEED / MADV_REMOVE / hole punch): it will fault again."""

    start: int
    end: int


@final
@dataclass(frozen=True, slots=True)
class Unmap:
    """[start, end) was unmapped: it is no longer registered."""

    start: int
    end: int


#: Any record parse_events() returns: for annotations, and isinstance() against the union.
Event = PageFault | Fork | Remap | Remove | Unmap


def parse_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Decode the uffd_msg records of one read().

    Raises ValueError when ``data`` is not a whole number of 32-byte messages or holds an event
    type this library does not know; never anything else.
    """
    size = _abi.UFFD_MSG.size
    if len(data) % size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte uffd_msg records")
    events: list[Event] = []
    for kind, _r1, _r2, _r3, arg in _abi.UFFD_MSG.iter_unpack(data):
        if kind == _abi.UFFD_EVENT_PAGEFAULT:
            flags, address, ptid = _abi.MSG_PAGEFAULT.unpack(arg)
            events.append(PageFault(address, FaultFlag(flags), ptid))
        elif kind == _abi.UFFD_EVENT_FORK:
            (ufd,) = _abi.MSG_FORK.unpack(arg)
            events.append(Fork(ufd))
        elif kind == _abi.UFFD_EVENT_REMAP:
            events.append(Remap(*_abi.MSG_REMAP.unpack(arg)))
        elif kind == _abi.UFFD_EVENT_REMOVE:
            events.append(Remove(*_abi.MSG_REMOVE.unpack(arg)))
        elif kind == _abi.UFFD_EVENT_UNMAP:
            events.append(Unmap(*_abi.MSG_REMOVE.unpack(arg)))
        else:
            raise ValueError(f"unknown userfaultfd event type 0x{kind:02x}")
    return events

"""The journal: the handler reads uffd messages straight into memory the supervisor shares.

Design note: why reading is where durability starts
---------------------------------------------------
An event is delivered once: the read() that returns it is the only copy, and the program goes on
(its madvise or mremap returns) as soon as it is read. A handler killed between that read and
its report to the supervisor would take the event with it, and a restarted handler would serve a
map that misses it (store bytes on a page the program dropped, a moved page filled from the
offset of its new address). So every read lands in this shared page, tagged with the source's
key written before the read; the handler clears it only after it has reported the events. When
a handler dies, the supervisor replays what is left here (REMOVE, UNMAP, REMAP) onto its own
map before it starts the next handler. A report sent just before the death is replayed twice,
which changes nothing: each of these events describes where ranges are now.

A FORK read and not yet sent on is lost with the handler all the same: the child's new uffd is
a descriptor in the reader's table, and nothing outside the process can take it from a process
killed at that moment. That window is one sendmsg() long.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from typing import final

from .._abi import UFFD_MSG
from .._errors import error
from .._events import Event, Remap, Remove, Unmap, parse_events

__all__ = ["Journal"]

_HEADER = struct.Struct("<Q")  # the key of the source whose messages follow
#: The most messages one read may bring in (the handler's batch is capped at it).
MAX_BATCH = 512


@final
class Journal:
    """One shared area: the key of the source being read, then up to MAX_BATCH messages."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _HEADER.size + MAX_BATCH * UFFD_MSG.size)  # shared, survives fork
        self._slots = memoryview(self._map)[_HEADER.size :]
        #: The area's address, for the native answerer (it reads into it too).
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def read(self, fd: int, key: int, batch: int) -> list[Event]:
        """Read up to ``batch`` messages of source ``key`` into the journal (nonblocking)."""
        size = min(batch, MAX_BATCH) * UFFD_MSG.size
        _HEADER.pack_into(self._map, 0, key)
        while True:
            try:
                got = os.readv(fd, [self._slots[:size]])
                break
            except BlockingIOError:
                return []
            except InterruptedError:
                continue
            except OSError as err:
                raise error(err.errno or 0, f"reading userfaultfd events: {err.strerror}") from err
        return parse_events(self._slots[:got])

    def clear(self) -> None:
        """The messages read are reported: nothing here needs replaying. (The native answerer
        reads here too, and leaves what it read: faults, which need no replay, or the events it
        hands back, which the handler reports before it clears.)"""
        self._slots[:] = bytes(len(self._slots))

    def pending(self) -> tuple[int, list[Remove | Unmap | Remap]]:
        """What a dead handler read and may not have reported: (source key, its changes)."""
        (key,) = _HEADER.unpack_from(self._map, 0)
        data = bytes(self._slots)
        whole = len(data) // UFFD_MSG.size
        records = [data[i * UFFD_MSG.size : (i + 1) * UFFD_MSG.size] for i in range(whole)]
        read = b"".join(r for r in records if r[0] != 0)  # slots are zero until a read fills them
        try:
            events = parse_events(read)
        except ValueError:  # a torn write cannot happen (read() fills whole messages); be safe
            events = []
        changes = [e for e in events if isinstance(e, Remove | Unmap | Remap)]
        return key, changes

"""The supervisor's map of the program's ranges, in memory the program shares: what the program's
watchdog settles if both daemons die.

Design note: the one failure the daemons cannot cover
------------------------------------------------------
The supervisor holds every uffd so that a handler's death costs a restart; the handler goes on
alone if the supervisor dies. If both die at once (both SIGKILLed, the OOM killer taking both),
nothing is left holding the program's uffd, the kernel unregisters its ranges, and every page
not filled yet would read zeros. So where the native extension is built, the program keeps one
descriptor of its uffd and a native watchdog thread (it needs no GIL: a thread of the program
may be blocked in a fault holding it) that waits for both daemons to end. If they end without
saying they finished (``Stats`` word ENDED), it settles every page of the program's ranges as
the supervisor last knew them (this area: where each range is now, which runs the program
dropped): dropped runs get zero pages (they read zeros, as without a handler), every other page
not there yet is poisoned (SIGBUS, never zeros), then it lets the uffd go.

Layout: eight header words (a generation, odd while the supervisor writes; a count; the running
handler's pid; whether the daemons ended having finished; whether the watchdog settled the
pages), then ``count`` records (address, length, page size, kind): kind 0 a registered range,
kind 1 a run of it the program dropped. A map that does not fit, or a generation left odd by a
death mid-write, makes the watchdog treat every range it was started with as registered with
nothing dropped: dropped pages then read SIGBUS, which is safe, not zeros where data belongs.
The area is a raw shared mapping, not a Python object: once the watchdog has it, the thread owns
it (and unmaps it when it is done), whatever becomes of the Server in the program.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import final

from .. import _libc
from ._ranges import RegionState

__all__ = ["MapExport"]

_WORD = struct.Struct("<Q")
_HEADER_WORDS = 8
#: The header's words (the C watchdog reads the same indices: _speedups.c).
GENERATION, COUNT, HANDLER_PID, ENDED, SETTLED = range(5)
_RECORD = struct.Struct("<QQQQ")  # address, length, page size, kind
#: Records the area holds (a program's map rarely has more than a few; a restored one may).
CAPACITY = 16384
RANGE, DROPPED = 0, 1


@final
class MapExport:
    """One shared area, made before the daemons are forked (so all three processes have it)."""

    def __init__(self) -> None:
        self.length = _HEADER_WORDS * 8 + CAPACITY * _RECORD.size
        self.address = _libc.mmap(0, self.length, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)  # fmt: skip
        self._area = (ctypes.c_char * self.length).from_address(self.address)
        self._generation = 0
        self._released = False

    def word(self, index: int) -> int:
        value: int = _WORD.unpack_from(self._area, index * 8)[0]
        return value

    def set_word(self, index: int, value: int) -> None:
        _WORD.pack_into(self._area, index * 8, value)

    def release(self) -> None:
        """Unmap the area here (when no watchdog took it over)."""
        if not self._released:
            self._released = True
            _libc.munmap(self.address, self.length)

    def write(self, regions: list[RegionState]) -> None:
        """Publish ``regions`` (the supervisor's map of the program's source, as it is now)."""
        if len(regions) > CAPACITY:  # cannot fit: say so at once, build nothing (see the top)
            self._generation = (self._generation + 2) | 1
            self.set_word(GENERATION, self._generation)
            return
        records: list[tuple[int, int, int, int]] = []
        for region in regions:
            records.append((region.address, region.length, region.page_size, RANGE))
            removed, page, index = region.removed, region.page_size, 0
            while (start := removed.find(1, index)) >= 0:
                stop = removed.find(0, start)
                stop = region.pages if stop < 0 else stop
                records.append((region.at(start), (stop - start) * page, page, DROPPED))
                index = stop
        self._generation = (self._generation + 2) | 1  # odd: being written
        self.set_word(GENERATION, self._generation)
        if len(records) > CAPACITY:
            return  # left odd: the watchdog falls back (see the module text)
        for i, record in enumerate(records):
            _RECORD.pack_into(self._area, _HEADER_WORDS * 8 + i * _RECORD.size, *record)
        self.set_word(COUNT, len(records))
        self._generation += 1  # even: whole (written last)
        self.set_word(GENERATION, self._generation)

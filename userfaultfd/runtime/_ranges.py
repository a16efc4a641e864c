"""The map of registered ranges: where each one is now, and which of its pages are settled.

A page is *settled* once it is present in the address space (filled from the store, zero-filled
after the program dropped it, or found there already) or poisoned. The runtime's invariant (see
_handler) is stated in these terms: a uffd is closed only once every page of its ranges is
settled or removed, or its process is gone. A removed page (MADV_DONTNEED, MADV_REMOVE) needs
nothing: once the range is unregistered the kernel zero-fills it, which is what it must read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from .._events import Remap, Remove, Unmap

__all__ = ["RegionMap", "RegionState", "unsettled_runs"]


@dataclass(slots=True)
class RegionState:
    """One registered range and which of its pages are settled."""

    address: int
    length: int
    #: Byte offset in the store of the range's first byte.
    offset: int
    page_size: int
    #: Tells ranges apart for policies that keep per-stream state.
    stream: int = 0
    settled: bytearray = field(default_factory=bytearray)
    #: Pages that read zeros from then on, as without a handler: dropped by a REMOVE event, or
    #: zeros the store knows of that a fill to the end left for the kernel to map.
    removed: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if not self.settled:
            self.settled = bytearray(self.pages)
        if not self.removed:
            self.removed = bytearray(self.pages)

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    @property
    def end(self) -> int:
        return self.address + self.length

    def at(self, index: int) -> int:
        """The address of page ``index``."""
        return self.address + index * self.page_size

    def piece(self, start: int, end: int, *, moved_to: int | None = None) -> RegionState:
        """The part [start, end) of this range (optionally moved to a new address)."""
        first = (start - self.address) // self.page_size
        last = (end - self.address) // self.page_size
        return RegionState(
            start if moved_to is None else moved_to, end - start,
            self.offset + (start - self.address), self.page_size, self.stream,
            self.settled[first:last], self.removed[first:last],
        )  # fmt: skip

    def forgotten(self) -> RegionState:
        """A copy with no page known settled (what a restarted handler can know: the kernel
        tells it nothing of what the dead one filled). Removed pages stay removed."""
        copy = self.piece(self.address, self.end)
        copy.settled = bytearray(self.pages)
        return copy


@dataclass(slots=True)
class RegionMap:
    """The registered ranges of one address space, kept up to date by its events, in address
    order (a restored program may have tens of thousands: a fault finds its range by bisection).
    """

    regions: list[RegionState]
    _starts: list[int] = field(default_factory=list, repr=False, compare=False)
    #: What the native answerer built from these regions (runtime/_answer.py); None after any
    #: change, so it is built again.
    native: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._changed()

    def _changed(self) -> None:
        self.regions.sort(key=lambda r: r.address)
        self._starts = [r.address for r in self.regions]
        self.native = None

    def find(self, address: int) -> RegionState | None:
        at = bisect.bisect_right(self._starts, address) - 1
        if at >= 0 and address < self.regions[at].end:
            return self.regions[at]
        return None

    def cut(self, start: int, end: int) -> list[RegionState]:
        """Split the regions at ``start`` and ``end``; returns the pieces inside [start, end)."""
        kept: list[RegionState] = []
        inside: list[RegionState] = []
        for region in self.regions:
            if region.end <= start or end <= region.address:
                kept.append(region)
                continue
            lo, hi = max(start, region.address), min(end, region.end)
            if region.address < lo:
                kept.append(region.piece(region.address, lo))
            inside.append(region.piece(lo, hi))
            if hi < region.end:
                kept.append(region.piece(hi, region.end))
        self.regions = kept
        self._changed()
        return inside

    def change(self, event: Remove | Unmap | Remap) -> None:
        """Follow a REMOVE (the pages read zeros now), UNMAP (forget) or REMAP (move)."""
        if isinstance(event, Unmap):
            self.cut(event.start, event.end)
            return
        if isinstance(event, Remove):
            pieces = self.cut(event.start, event.end)
            for piece in pieces:
                piece.settled[:] = bytes(piece.pages)
                piece.removed[:] = b"\x01" * piece.pages
        else:
            pieces = self.cut(event.old, event.old + event.length)
            for piece in pieces:
                piece.address = event.new + (piece.address - event.old)
        self.regions.extend(pieces)
        self._changed()

    def forgotten(self) -> list[RegionState]:
        return [region.forgotten() for region in self.regions]


def unsettled_runs(region: RegionState, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of pages in [start, end) that are neither settled nor removed."""
    settled, removed = region.settled, region.removed  # bytes 0 or 1: searched in C, not looped
    index = start
    while index < end:
        run = settled.find(0, index, end)
        if run < 0:
            return
        if removed[run]:
            index = run + 1
            continue
        stop = settled.find(1, run, end)
        stop = end if stop < 0 else stop
        gone = removed.find(1, run, stop)
        stop = stop if gone < 0 else gone
        yield run, stop
        index = stop

"""The supervisor's map as the program's watchdog reads it (runtime/_export.py), with no kernel."""

from __future__ import annotations

import ctypes

from userfaultfd.runtime._export import (
    CAPACITY,
    COUNT,
    DROPPED,
    GENERATION,
    RANGE,
    MapExport,
)
from userfaultfd.runtime._ranges import RegionState

PAGE = 4096


def _records(export: MapExport) -> list[tuple[int, ...]]:
    words = (ctypes.c_uint64 * (8 + 4 * export.word(COUNT))).from_address(export.address)
    return [tuple(words[8 + 4 * i : 12 + 4 * i]) for i in range(export.word(COUNT))]


def test_ranges_and_their_dropped_runs_are_published_whole() -> None:
    export = MapExport()
    try:
        moved = RegionState(0x20000000, 8 * PAGE, 0, PAGE)
        moved.removed[2:4] = b"\x01\x01"
        moved.removed[7] = 1
        other = RegionState(0x30000000, 4 * PAGE, 8 * PAGE, PAGE)
        export.write([moved, other])
        assert export.word(GENERATION) % 2 == 0, "a whole map has an even generation"
        assert _records(export) == [
            (0x20000000, 8 * PAGE, PAGE, RANGE),
            (0x20000000 + 2 * PAGE, 2 * PAGE, PAGE, DROPPED),
            (0x20000000 + 7 * PAGE, PAGE, PAGE, DROPPED),
            (0x30000000, 4 * PAGE, PAGE, RANGE),
        ], _records(export)
        first = export.word(GENERATION)
        export.write([other])
        assert export.word(GENERATION) > first and export.word(GENERATION) % 2 == 0
        assert _records(export) == [(0x30000000, 4 * PAGE, PAGE, RANGE)], _records(export)
    finally:
        export.release()


def test_a_map_too_big_for_the_area_is_marked_unusable() -> None:
    export = MapExport()
    try:
        export.write([RegionState(0x20000000, PAGE, 0, PAGE)])
        many = [RegionState(0x40000000 + i * 2 * PAGE, PAGE, 0, PAGE) for i in range(CAPACITY + 1)]
        export.write(many)
        assert export.word(GENERATION) % 2 == 1, "the watchdog must fall back, not read a stale map"
    finally:
        export.release()

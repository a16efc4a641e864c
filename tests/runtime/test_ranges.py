"""The range map's search for pages still to fill (pure: no kernel)."""

from __future__ import annotations

from userfaultfd.runtime._ranges import RegionState, unsettled_runs

PAGE = 4096


def region(settled: str, removed: str) -> RegionState:
    """A region of len(settled) pages; "1" marks a settled (or removed) page."""
    state = RegionState(0x10000, len(settled) * PAGE, 0, PAGE)
    state.settled[:] = bytes(int(c) for c in settled)
    state.removed[:] = bytes(int(c) for c in removed)
    return state


def test_runs_skip_settled_and_removed_pages() -> None:
    state = region("0011000100", "0000010001")
    assert list(unsettled_runs(state, 0, 10)) == [(0, 2), (4, 5), (6, 7), (8, 9)]


def test_runs_are_clipped_to_the_range_asked() -> None:
    state = region("0011000100", "0000010001")
    assert list(unsettled_runs(state, 1, 5)) == [(1, 2), (4, 5)]
    assert list(unsettled_runs(state, 2, 4)) == []


def test_a_settled_page_that_was_removed_is_done_and_all_settled_is_empty() -> None:
    assert list(unsettled_runs(region("0100", "0110"), 0, 4)) == [(0, 1), (3, 4)]
    assert list(unsettled_runs(region("1111", "0000"), 0, 4)) == []

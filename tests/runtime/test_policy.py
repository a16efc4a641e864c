"""Fault-around policies, without a kernel."""

from __future__ import annotations

import pytest

from userfaultfd.runtime import Adaptive, Single, Window

PAGE = 4096


def test_single_is_one_page() -> None:
    assert Single().window(7, 100, PAGE) == (7, 8)


@pytest.mark.parametrize(
    ("index", "expected"), [(0, (0, 16)), (15, (0, 16)), (16, (16, 32)), (97, (96, 100))]
)
def test_window_is_aligned_and_clipped(index: int, expected: tuple[int, int]) -> None:
    assert Window(16).window(index, 100, PAGE) == expected


def test_window_needs_a_page() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        Window(0)


def test_adaptive_grows_on_a_stream_and_resets_on_a_jump() -> None:
    policy = Adaptive(min_pages=1, max_bytes=8 * PAGE)
    windows = []
    index = 0
    for _ in range(6):
        start, end = policy.window(index, 1000, PAGE)
        windows.append((start, end))
        index = end  # the next fault lands where the window ended: a sequential stream
    assert windows == [(0, 1), (1, 5), (5, 13), (13, 21), (21, 29), (29, 37)]
    assert policy.window(500, 1000, PAGE) == (500, 501)  # random access: back to one page


def test_adaptive_keeps_streams_apart() -> None:
    policy = Adaptive(min_pages=2, max_bytes=64 * PAGE)
    assert policy.window(0, 100, PAGE, stream=1) == (0, 2)
    assert policy.window(50, 100, PAGE, stream=2) == (50, 52)
    assert policy.window(2, 100, PAGE, stream=1) == (2, 10)  # stream 1 went on (4x: small)
    assert policy.window(52, 100, PAGE, stream=2) == (52, 60)


def test_adaptive_ceiling_is_in_bytes() -> None:
    huge = 2 << 20
    policy = Adaptive(min_pages=1, max_bytes=8 << 20)
    index = 0
    for _ in range(5):
        start, end = policy.window(index, 100, huge)
        index = end
    assert end - start == 4  # 8 MiB of 2 MiB pages


def test_adaptive_grows_4x_a_step_up_to_its_ceiling() -> None:
    policy = Adaptive(min_pages=1, max_bytes=200 * PAGE)
    sizes, index = [], 0
    for _ in range(7):
        start, end = policy.window(index, 10_000, PAGE)
        sizes.append(end - start)
        index = end
    assert sizes == [1, 4, 16, 64, 200, 200, 200]


def test_a_fault_anywhere_in_the_read_ahead_continues_the_stream() -> None:
    policy = Adaptive(min_pages=1, max_bytes=8 * PAGE, readahead_windows=2)
    assert policy.window(0, 1000, PAGE) == (0, 1)
    assert policy.window(1, 1000, PAGE) == (1, 5)
    assert policy.readahead(1, 1, 5, 1000, PAGE) == (5, 13)  # two windows of 4 pages
    # The first pages of the read-ahead were in already: the fault came further on.
    assert policy.window(9, 1000, PAGE) == (9, 17)
    assert policy.readahead(9, 9, 17, 1000, PAGE) == (17, 33)
    assert policy.window(33, 1000, PAGE) == (33, 41)  # its very end still counts
    assert policy.window(60, 1000, PAGE) == (60, 61)  # past it: random access


def test_adaptive_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="readahead_windows"):
        Adaptive(readahead_windows=0)


def test_a_fault_on_a_marker_inside_the_window_continues_the_stream() -> None:
    """The handler keeps back the first page of every read of the read-ahead: the reader's
    fault there may land inside the window the last such fault chose."""
    policy = Adaptive(min_pages=1, max_bytes=8 * PAGE, readahead_windows=2)
    assert policy.window(0, 1000, PAGE) == (0, 1)
    assert policy.window(1, 1000, PAGE) == (1, 5)
    assert policy.readahead(1, 1, 5, 1000, PAGE) == (5, 13)
    assert policy.window(3, 1000, PAGE) == (3, 11)  # past the window's start: still the stream
    assert policy.window(3, 1000, PAGE) == (3, 4)  # the same page again: not a stream going on

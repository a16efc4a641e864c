"""Test helpers: a forked target process (see userfaultfd._forked), and recognisable pages."""

from __future__ import annotations

import hashlib

from userfaultfd import Event, Userfaultfd, memory
from userfaultfd._forked import Channel as Channel
from userfaultfd._forked import ChildFailedError as ChildFailedError
from userfaultfd._forked import Forked as Target
from userfaultfd._forked import next_events as next_events

__all__ = [
    "PAGE",
    "Channel",
    "ChildFailedError",
    "Target",
    "next_event",
    "next_events",
    "page_difference",
    "pattern",
]

PAGE = memory.page_size()


def pattern(seed: int, size: int = PAGE) -> bytes:
    """``size`` bytes that differ for every ``seed``: a page nobody could mistake for another."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    return (block * (size // len(block) + 1))[:size]


def next_event(uffd: Userfaultfd, timeout: float = 5.0) -> Event:
    """Exactly one event (the test expects a single pending one)."""
    events = next_events(uffd, timeout)
    assert len(events) == 1, f"expected one event, got {events}"
    return events[0]


def page_difference(got: bytes | memoryview, want: bytes | memoryview, page: int = PAGE) -> str:
    """ "" when ``got`` equals ``want``; else the first page that differs, what it held, what it
    should have held (first differing byte and 16 bytes from there), for an assert message."""
    got, want = bytes(got), bytes(want)
    if got == want:
        return ""
    if len(got) != len(want):
        return f"{len(got)} bytes where {len(want)} were expected"
    at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    index, offset = divmod(at, page)
    return (
        f"page {index} differs first (byte {offset}): it held {got[at : at + 16]!r}, "
        f"expected {want[at : at + 16]!r}"
    )

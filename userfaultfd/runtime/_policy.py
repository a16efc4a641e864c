"""Fault-around in userspace: which pages to fill when one page faults.

The seed's principle made into a knob: in a userfaultfd range the kernel maps nothing by itself,
so the handler decides how much to fill per fault. One page per fault costs one round trip per
page; a window amortises the round trip over many pages; an adaptive window does so only while
the access pattern is sequential, like the kernel's readahead.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import final

__all__ = ["Adaptive", "Policy", "Single", "Window"]


class Policy(abc.ABC):
    """Chooses the pages [start, end) to fill for a fault on page ``index``."""

    @abc.abstractmethod
    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        """For a fault on page ``index`` of a region of ``pages`` pages of ``page_size`` bytes.

        ``stream`` tells regions apart for policies that keep per-stream state. The handler
        skips pages already filled, and fills the faulting page first.
        """

    def readahead(
        self, index: int, start: int, end: int, pages: int, page_size: int, stream: int = 0
    ) -> tuple[int, int] | None:
        """Pages to read ahead of the window [start, end) just chosen for a fault on ``index``,
        when the store keeps many reads in flight. The handler keeps the first page of each of
        their reads (a marker) back until the program faults on it, and that fault tops the
        read-ahead up: a policy must count a fault anywhere in the read-ahead as the stream
        going on. Default: none."""
        return None


@final
class Single(Policy):
    """One page per fault."""

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        return index, index + 1

    def __repr__(self) -> str:
        return "Single()"


@final
class Window(Policy):
    """A naturally aligned window of ``pages`` pages around the fault, clipped to the region."""

    def __init__(self, pages: int = 16) -> None:
        if pages < 1:
            raise ValueError(f"a window has at least one page, not {pages}")
        self.pages = pages

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        start = index - index % self.pages
        return start, min(start + self.pages, pages)

    def __repr__(self) -> str:
        return f"Window({self.pages})"


@dataclass(slots=True)
class _Stream:
    start: int = -1  # where the last window started
    next_index: int = -1  # where it ended
    ahead_end: int = -1  # where its read-ahead ended
    size: int = 1


@dataclass
@final
class Adaptive(Policy):
    """Readahead for faults: a window that grows while faults continue past the start of the
    previous window, up to the end of its read-ahead, up to ``max_bytes``, and falls back to
    ``min_pages`` on a random access. It grows 4x a step, up to the ceiling: a step costs a round
    trip to a remote store (the kernel's readahead, get_next_ra_size, slows to 2x near its
    ceiling; here those steps cost more than they save: 0.88x -> 0.99x the eager GET's speed
    over a 10 ms link, in benchmarks/remote.py's sequential row, mean of six runs).
    ``readahead_windows``: how many windows of the current size are read ahead of a stream
    when the store keeps many reads in flight (enough to cover the link's bandwidth-delay
    product, so the program never waits for a window it is about to reach)."""

    min_pages: int = 1
    max_bytes: int = 8 << 20
    readahead_windows: int = 2
    _streams: dict[int, _Stream] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.min_pages < 1 or self.max_bytes < 1 or self.readahead_windows < 1:
            raise ValueError(
                f"Adaptive needs min_pages, max_bytes and readahead_windows >= 1, not "
                f"{self.min_pages}, {self.max_bytes} and {self.readahead_windows}"
            )

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        state = self._streams.setdefault(stream, _Stream(size=self.min_pages))
        ceiling = max(self.min_pages, self.max_bytes // page_size)
        if state.start < index <= max(state.next_index, state.ahead_end):
            state.size = min(state.size * 4, ceiling)  # the stream went on: read further
        else:
            state.size = self.min_pages
            state.ahead_end = -1
        end = min(index + state.size, pages)
        state.start, state.next_index = index, end
        return index, end

    def readahead(
        self, index: int, start: int, end: int, pages: int, page_size: int, stream: int = 0
    ) -> tuple[int, int] | None:
        """A stream that went on: ``readahead_windows`` more windows of this one's size."""
        if end - start <= self.min_pages or end >= pages:
            return None
        state = self._streams.setdefault(stream, _Stream(size=self.min_pages))
        ahead = min(end + self.readahead_windows * (end - start), pages)
        state.ahead_end = max(state.ahead_end, ahead)
        return end, ahead

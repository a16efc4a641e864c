"""Fault-around in userspace: which pages to fill when one page faults.

The seed's principle made into a knob: in a userfaultfd range the kernel maps nothing by itself,
so the handler decides how much to fill per fault. One page per fault costs one round trip per
page; a window amortises the round trip over many pages; an adaptive window does so only while
the access pattern is sequential, like the kernel's readahead.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

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
        when the store keeps many reads in flight: the handler keeps their first page back
        until the program faults on it, which asks for the window after. Default: none."""
        return None


class Single(Policy):
    """One page per fault."""

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        return index, index + 1

    def __repr__(self) -> str:
        return "Single()"


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
    next_index: int = -1
    size: int = 1


@dataclass
class Adaptive(Policy):
    """Readahead for faults: a window that doubles while faults continue where the previous
    window ended, up to ``max_bytes``, and falls back to ``min_pages`` on a random access."""

    min_pages: int = 1
    max_bytes: int = 8 << 20
    _streams: dict[int, _Stream] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.min_pages < 1 or self.max_bytes < 1:
            raise ValueError(
                f"Adaptive needs min_pages >= 1 and max_bytes >= 1, not {self.min_pages} and "
                f"{self.max_bytes}"
            )

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        state = self._streams.setdefault(stream, _Stream(size=self.min_pages))
        ceiling = max(self.min_pages, self.max_bytes // page_size)
        if index == state.next_index:
            state.size = min(state.size * 2, ceiling)  # the stream went on: read further ahead
        else:
            state.size = self.min_pages
        end = min(index + state.size, pages)
        state.next_index = end
        return index, end

    def readahead(
        self, index: int, start: int, end: int, pages: int, page_size: int, stream: int = 0
    ) -> tuple[int, int] | None:
        """A stream that went on: one more window of the same size, ahead of this one."""
        if end - start <= self.min_pages or end >= pages:
            return None
        return end, min(end + (end - start), pages)

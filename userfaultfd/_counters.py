"""Counters and a latency histogram in memory shared by a handler process and its owner.

The handler is the only writer; the owner reads whenever it likes (a torn read of two counters
is possible and harmless). Latencies go into a log-linear histogram: four buckets per power of
two of nanoseconds, so a percentile is known within 19%.
"""

from __future__ import annotations

import ctypes
import math
import mmap

__all__ = ["SharedCounters"]

_BUCKETS = 4 * 64
_SUB = 4


class SharedCounters:
    """``count`` counters and one histogram; create before fork, then use in both processes."""

    def __init__(self, count: int, text: int = 0) -> None:
        self._count = count
        self._text_at = 8 * (count + _BUCKETS)
        self._text = text
        # MAP_SHARED: survives fork. After the words, a note of ``text`` bytes (see note()).
        self._mmap = mmap.mmap(-1, self._text_at + 8 + text)
        self._words = memoryview(self._mmap).cast("Q")
        # The words' address, for native code that counts too (the mapping is never closed:
        # it lives as long as this object, in every process that has a copy).
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        #: Where the histogram's buckets start, in words.
        self.histogram_index = count

    def add(self, counter: int, amount: int = 1) -> None:
        self._words[counter] = (self._words[counter] + amount) % (1 << 64)

    def set(self, counter: int, value: int) -> None:
        self._words[counter] = value

    def value(self, counter: int) -> int:
        return self._words[counter]

    def note(self, message: str) -> None:
        """Keep ``message`` (cut to fit) where the owner reads it with :meth:`noted`: the
        bytes first, their length last, so a reader sees the old note or the new one."""
        data = message.encode("utf-8", "replace")[: self._text]
        start = self._text_at + 8
        self._mmap[start : start + len(data)] = data
        self._mmap[self._text_at : self._text_at + 8] = len(data).to_bytes(8, "little")

    def noted(self) -> str:
        length = min(int.from_bytes(self._mmap[self._text_at : self._text_at + 8], "little"),
                     self._text)  # fmt: skip
        start = self._text_at + 8
        return self._mmap[start : start + length].decode("utf-8", "replace")

    def record_latency(self, nanoseconds: int) -> None:
        bucket = min(int(_SUB * math.log2(nanoseconds)), _BUCKETS - 1) if nanoseconds > 0 else 0
        self._words[self._count + bucket] += 1

    def percentile_us(self, q: float) -> float:
        """The ``q`` quantile of the recorded latencies, in microseconds (0 if none)."""
        hist = self._words[self._count : self._count + _BUCKETS].tolist()
        total = sum(hist)
        seen = 0
        for bucket, count in enumerate(hist):
            seen += count
            if total and seen >= q * total:
                return float(2 ** ((bucket + 1) / _SUB) / 1000.0)  # the bucket's upper edge
        return 0.0

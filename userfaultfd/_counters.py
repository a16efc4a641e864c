"""Counters and a latency histogram in memory shared by a handler process and its owner.

The handler is the only writer; the owner reads whenever it likes (a torn read of two counters
is possible and harmless). Latencies go into a log-linear histogram: four buckets per power of
two of nanoseconds, so a percentile is known within 19%.

A block made with a ``name`` lives in a memfd of that name, so another process can find it in
``/proc/PID/maps`` (``/memfd:NAME (deleted)``) and read it (``uffd top``, with :meth:`reading`).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from typing import Self

__all__ = ["SharedCounters"]

_BUCKETS = 4 * 64
_SUB = 4


class SharedCounters:
    """``count`` counters and one histogram; create before fork, then use in both processes."""

    def __init__(self, count: int, text: int = 0, *, name: str | None = None) -> None:
        self._count = count
        self._text_at = 8 * (count + _BUCKETS)
        self._text = text
        # MAP_SHARED: survives fork. After the words, a note of ``text`` bytes (see note()).
        self._mmap: mmap.mmap | bytes = _shared(self.length(count, text), name)
        self._words = memoryview(self._mmap).cast("Q")
        # The words' address, for native code that counts too (the mapping is never closed:
        # it lives as long as this object, in every process that has a copy).
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        #: Where the histogram's buckets start, in words.
        self.histogram_index = count

    @staticmethod
    def length(count: int, text: int = 0) -> int:
        """The bytes a block of ``count`` counters and a ``text``-byte note takes."""
        return 8 * (count + _BUCKETS) + 8 + text

    @classmethod
    def reading(cls, data: bytes, count: int, text: int = 0) -> Self:
        """A read-only block over ``data``: the bytes of a block made elsewhere with the same
        ``count`` and ``text`` (read from another process), for :meth:`value`, :meth:`noted`
        and :meth:`percentile_us`."""
        if len(data) != cls.length(count, text):
            raise ValueError(f"{len(data)} bytes is not a block of {count} counters and a "
                             f"{text}-byte note ({cls.length(count, text)} bytes)")  # fmt: skip
        block = cls.__new__(cls)
        block._count, block._text_at, block._text = count, 8 * (count + _BUCKETS), text
        block._mmap = data
        block._words = memoryview(data).cast("Q")
        block.address = 0
        block.histogram_index = count
        return block

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
        assert isinstance(self._mmap, mmap.mmap), "a block read from elsewhere is read-only"
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


def _shared(length: int, name: str | None) -> mmap.mmap:
    """``length`` bytes of shared memory (zeros): in a memfd called ``name`` when given (and the
    kernel lets this process make one), else anonymous."""
    if name is not None:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError:  # no memfd here (a seccomp filter): the block works, unnamed
            pass
        else:
            try:
                os.ftruncate(fd, length)
                return mmap.mmap(fd, length)  # MAP_SHARED; the mapping holds the file
            finally:
                os.close(fd)
    return mmap.mmap(-1, length)

"""Assertions shared by the store tests."""

from __future__ import annotations

import errno

from hypothesis import strategies as st

from userfaultfd.stores import Store, StoreError


def assert_range(store: Store, data: bytes, offset: int, length: int) -> None:
    """``store`` gives exactly ``data[offset:offset + length]``, short only where ``data`` ends."""
    buffer = bytearray(b"\xa5" * length)
    got = store.read_into(offset, memoryview(buffer))
    expected = data[offset : offset + length]
    assert got == len(expected), f"read {got} bytes at {offset}, expected {len(expected)}"
    assert buffer[:got] == expected, f"wrong bytes in [{offset}, {offset + got})"
    # The rest of the buffer is untouched: nothing past the end is invented.
    assert buffer[got:] == b"\xa5" * (length - got)


def ranges(size: int, max_length: int) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) pairs, biased to the edges: start, end, and just past the end."""
    offsets = st.one_of(
        st.integers(0, size + 16),
        st.integers(max(0, size - max_length), size + 16),
        st.just(0),
    )
    return st.tuples(offsets, st.integers(0, max_length))


class CountingStore(Store):
    """A store that counts the reads it passes to ``inner`` (and their ranges)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []
        self.fail_from: int | None = None  # reads at or past this offset raise StoreError

    @property
    def size(self) -> int:
        return self.inner.size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        self.reads.append((offset, len(buffer)))
        if self.fail_from is not None and offset + len(buffer) > self.fail_from:
            raise StoreError(errno.EIO, f"injected failure at {offset}")
        return self.inner.read_into(offset, buffer)

    def reopen(self) -> CountingStore:
        return CountingStore(self.inner.reopen())

    def close(self) -> None:
        self.inner.close()

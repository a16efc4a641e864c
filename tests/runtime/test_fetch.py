"""Many reads in flight: a slow store that serves reads concurrently, through every policy."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests._target import PAGE, Channel, Target
from tests.runtime.test_serve import POLICIES, in_target
from userfaultfd import memory
from userfaultfd.runtime import Adaptive, Policy, Single, serve
from userfaultfd.stores import Store, StoreError

PAGES = 512


def page_bytes(index: int) -> bytes:
    """Page ``index``: every byte depends on the page, none is zero."""
    return bytes((index * 13 + i) % 251 + 1 for i in range(256)) * (PAGE // 256)


SOURCE = b"".join(page_bytes(i) for i in range(PAGES))


class _Slow(Store):
    """SOURCE, each read taking ``delay`` seconds (a round trip), many at once; reads that
    touch page ``bad`` fail. Counts the reads in flight at most."""

    def __init__(self, delay: float = 0.01, bad: int = -1, zero_from: int = PAGES) -> None:
        self.delay = delay
        self.bad = bad
        self.zero_from = zero_from
        self._lock = threading.Lock()
        self.in_flight = 0
        # Shared with this process: the reads happen in the handler, a process forked later.
        self._most = mmap.mmap(-1, 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    @property
    def most(self) -> int:
        return int.from_bytes(self._most[:8], "little")

    @property
    def size(self) -> int:
        return len(SOURCE)

    @property
    def parallel_reads(self) -> int:
        return 8

    def known_zero(self, offset: int, length: int) -> bool:
        return offset >= self.zero_from * PAGE

    def read_into(self, offset: int, buffer: memoryview) -> int:
        with self._lock:
            self.in_flight += 1
            self._most[:8] = max(self.most, self.in_flight).to_bytes(8, "little")
        try:
            time.sleep(self.delay)
            first, last = offset // PAGE, -(-(offset + len(buffer)) // PAGE)
            if first <= self.bad < last:
                raise StoreError(errno.EIO, f"page {self.bad} cannot be read")
            chunk = SOURCE[offset : offset + len(buffer)]
            buffer[: len(chunk)] = chunk
            return len(chunk)
        finally:
            with self._lock:
                self.in_flight -= 1


class _Logged(_Slow):
    """A :class:`_Slow` store that logs the size of every read, in pages, in shared memory."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self._log = mmap.mmap(-1, 8 * (PAGES + 1), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._log_lock = threading.Lock()

    @property
    def reads(self) -> list[int]:
        count = int.from_bytes(self._log[:8], "little")
        return [int.from_bytes(self._log[8 * i : 8 * i + 8], "little") for i in range(1, count + 1)]

    def read_into(self, offset: int, buffer: memoryview) -> int:
        with self._log_lock:
            count = int.from_bytes(self._log[:8], "little") + 1
            if count <= PAGES:
                self._log[8 * count : 8 * count + 8] = (len(buffer) // PAGE).to_bytes(8, "little")
                self._log[:8] = count.to_bytes(8, "little")
        return super().read_into(offset, buffer)


def _first_wrong(data: bytes, pages: range) -> str | None:
    for index in pages:
        got = data[index * PAGE : (index + 1) * PAGE]
        if got != page_bytes(index):
            return f"page {index} held {got[:8].hex()}..., expected {page_bytes(index)[:8].hex()}"
    return None


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_a_slow_concurrent_store_is_served_byte_for_byte(policy: Policy) -> None:
    def body() -> tuple[str | None, int]:
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], _Slow(), policy=policy)
        wrong = _first_wrong(bytes(mapping.view), range(PAGES))
        server.stop()
        return wrong, server.stats().pages

    wrong, pages = in_target(body)
    assert wrong is None, wrong
    assert pages == PAGES, f"{pages} pages filled of {PAGES}"


@pytest.mark.timeout(60)
def test_four_threads_fault_at_once_and_their_reads_overlap() -> None:
    """Four native threads on random pages of a 10 ms store: every fault answered (no hang),
    every byte right, and more than one read in flight at a time."""

    def body() -> tuple[str | None, int]:
        store = _Slow(delay=0.01)
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], store, policy=Single())
        pages = [list(range(start, PAGES, 4))[:40] for start in range(4)]
        copies = {i: ctypes.create_string_buffer(PAGE) for i in range(PAGES)}

        def touch(mine: list[int]) -> None:
            for index in mine:
                ctypes.memmove(copies[index], mapping.address + index * PAGE, PAGE)

        threads = [threading.Thread(target=touch, args=(p,)) for p in pages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        wrong = next(
            (f"page {i} held {copies[i].raw[:8].hex()}" for p in pages for i in p
             if copies[i].raw != page_bytes(i)),
            None,
        )  # fmt: skip
        if any(thread.is_alive() for thread in threads):
            wrong = "a faulting thread never returned"
        server.stop()
        return wrong, store.most

    wrong, most = in_target(body)
    assert wrong is None, wrong
    assert most > 1, f"at most {most} read in flight: faults were served one at a time"


@pytest.mark.timeout(60)
def test_a_sequential_reader_keeps_its_window_over_a_slow_store() -> None:
    """Read in order, 10 ms a read, pausing now and then: the window grows to its ceiling and
    stays there, whatever part of the read-ahead is in by the time the reader goes on. (A
    read-ahead whose first page was in already had no marker, the next fault was taken for a
    random access, and the window fell back to one page: a round trip per few pages.)"""

    def body() -> tuple[str | None, list[int]]:
        store = _Logged(delay=0.01)
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], store, policy=Adaptive(max_bytes=16 * PAGE))
        view = mapping.view
        for index in range(PAGES):  # in order, a page at a time, as a scan does
            if index % 32 == 0:
                time.sleep(0.05)  # work between: the read-ahead is all in when it goes on
            _ = view[index * PAGE]
        wrong = _first_wrong(bytes(view), range(PAGES))
        server.stop()
        return wrong, store.reads

    wrong, reads = in_target(body)
    assert wrong is None, wrong
    # Pages: the windows of 1 and 4, the read-ahead of two windows of 4, the rest of the first
    # window of 16; from then on reads of the ceiling's 16 or more (two windows' top-up: 32).
    ramp = [1, 4, 8, 8]
    assert reads[:4] == ramp and min(reads[4:-1]) >= 16, (
        f"reads of {reads} pages: after the ramp {ramp}, a read smaller than the window"
    )


def test_a_failed_read_ahead_poisons_only_its_own_pages() -> None:
    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(SOURCE))
        serve([mapping], _Slow(bad=40), policy=Adaptive(max_bytes=64 * PAGE))
        channel.send((_first_wrong(bytes(mapping.view[: 40 * PAGE]), range(40)), None))
        _ = mapping.view[40 * PAGE]

    with Target(body) as target:
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong
        status = target.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
            f"reading the page the store cannot give ended with status {status}, not SIGBUS"
        )


def test_known_zero_pages_are_mapped_without_a_read() -> None:
    def body() -> tuple[str | None, int, int]:
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], _Slow(zero_from=PAGES // 2), policy=Single())
        data = bytes(mapping.view)
        wrong = _first_wrong(data, range(PAGES // 2))
        if data[PAGES // 2 * PAGE :] != bytes(PAGES // 2 * PAGE):
            wrong = "a known-zero page was not zeros"
        stats = server.stop()
        return wrong, stats.zeros, stats.pages

    wrong, zeros, pages = in_target(body)
    assert wrong is None, wrong
    assert (zeros, pages) == (PAGES // 2, PAGES // 2), f"zeros {zeros}, filled {pages}"


def test_a_recorded_working_set_is_prefetched_on_the_next_run(tmp_path: Path) -> None:
    record = tmp_path / "working-set"
    touched = [(i * 37) % PAGES for i in range(0, 60)]

    def run(
        record: Path | None = None, prefetch: Path | None = None
    ) -> tuple[str | None, int, int]:
        def body() -> tuple[str | None, int, int]:
            mapping = memory.anonymous(len(SOURCE))
            server = serve(
                [mapping], _Slow(delay=0.002), policy=Single(), record=record, prefetch=prefetch
            )
            if prefetch is not None:
                deadline = time.monotonic() + 10
                while server.stats().prefetched < len(set(touched)) and time.monotonic() < deadline:
                    time.sleep(0.01)
            before = server.stats().faults
            wrong = None
            for index in touched:
                if bytes(mapping.view[index * PAGE : (index + 1) * PAGE]) != page_bytes(index):
                    wrong = f"page {index} wrong"
            stats = server.stop()
            return wrong, stats.faults - before, stats.prefetched

        result: tuple[str | None, int, int] = in_target(body)
        return result

    wrong, faults, _ = run(record=record)
    assert wrong is None, wrong
    assert faults == len(set(touched)), f"{faults} faults recording {len(set(touched))} pages"
    wrong, faults, prefetched = run(prefetch=record)
    assert wrong is None, wrong
    assert prefetched == len(set(touched)), f"{prefetched} pages prefetched"
    assert faults == 0, f"{faults} faults on pages that were prefetched"

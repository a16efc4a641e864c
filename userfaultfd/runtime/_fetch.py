"""Many store reads in flight: worker threads, each reading into a buffer of its own.

Design note
-----------
A remote store answers each read after a round trip, so one read at a time caps a handler at
(read size / RTT), and a fault queued behind another fault's read waits for both. The handler
keeps up to ``depth`` reads outstanding and never waits on the store itself: it answers each
fault as soon as the bytes of its page arrive, and it goes on reading events meanwhile, so the
program's munmap() and madvise() never wait on the network. Reads a thread is blocked on (demand)
go before read-ahead and prefetch. Buffer memory is bounded: ``depth`` buffers of ``unit`` bytes.
The store's reads run in these threads (the GIL is released while they wait on the network);
only a store that says it can serve reads concurrently (``Store.parallel_reads``) is read here.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field

from .._buffer import pinned
from ..stores import Store, StoreError

__all__ = ["Fetch", "Fetcher", "read_range"]


@dataclass(slots=True, eq=False)
class Fetch:
    """One store read: bytes [offset, offset + size) for source ``key``."""

    key: int
    offset: int
    size: int
    #: A thread waits on a page of it (else read-ahead or prefetch).
    demand: bool
    #: Prefetch: install without waking, then wake the whole run once.
    prefetch: bool = False
    #: A store offset whose page is kept back when the bytes arrive: the page a sequential
    #: reader faults on next, which tells the handler to read further ahead.
    marker: int = -1
    #: Faults waiting on it: (source key, address, when asked in perf_counter_ns).
    waiters: list[tuple[int, int, int]] = field(default_factory=list)
    # Set by the worker that read it:
    address: int = 0
    error: BaseException | None = None
    failed_quickly: bool = True
    _slot: int = -1
    _released: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.size

    def covers(self, key: int, offset: int) -> bool:
        return key == self.key and self.offset <= offset < self.end


class Fetcher:
    """Up to ``depth`` worker threads reading ``store`` into buffers of ``unit`` bytes."""

    def __init__(self, store: Store, depth: int, unit: int, wake: int) -> None:
        self.store = store
        self.unit = unit
        self._wake = wake
        self._lock = threading.Condition()
        self._demand: deque[Fetch] = deque()
        self._ahead: deque[Fetch] = deque()
        self._done: deque[Fetch] = deque()
        #: Every fetch not yet released: queued, being read, or read and not yet placed.
        self.pending: list[Fetch] = []
        self._stopping = False
        self._resources = ExitStack()
        self._buffers: list[mmap.mmap] = []
        self._addresses: list[int] = []
        self._released: list[threading.Event] = []
        self.workers = depth
        self._threads: list[threading.Thread] = []
        self._idle = 0  # started workers waiting for a fetch

    def _start_worker(self) -> None:
        """One more worker, with its buffer. Workers start as reads come in, not all at once:
        starting sixteen threads took the first fault milliseconds."""
        slot = len(self._threads)
        buffer = mmap.mmap(-1, self.unit, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buffers.append(buffer)
        self._addresses.append(self._resources.enter_context(pinned(buffer))[0])
        self._released.append(threading.Event())
        thread = threading.Thread(
            target=self._work, args=(slot,), name=f"uffd-fetch-{slot}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def submit(self, fetch: Fetch) -> None:
        assert 0 < fetch.size <= self.unit
        with self._lock:
            self.pending.append(fetch)
            (self._demand if fetch.demand else self._ahead).append(fetch)
            more = len(self._demand) + len(self._ahead) > self._idle
            self._lock.notify()
        if more and len(self._threads) < self.workers:
            self._start_worker()

    def covering(self, key: int, offset: int) -> Fetch | None:
        for fetch in self.pending:
            if fetch.covers(key, offset):
                return fetch
        return None

    def promote(self, fetch: Fetch) -> None:
        """A thread now waits on ``fetch``: read it before any read-ahead still queued."""
        with self._lock:
            if not fetch.demand and fetch in self._ahead:
                self._ahead.remove(fetch)
                self._demand.append(fetch)
            fetch.demand = True

    def completed(self) -> list[Fetch]:
        with self._lock:
            done = list(self._done)
            self._done.clear()
        return done

    def release(self, fetch: Fetch) -> None:
        """The bytes of ``fetch`` are placed (or given up): its buffer may be read into again.
        Idempotent."""
        with self._lock:
            if fetch._released:
                return
            fetch._released = True
            with contextlib.suppress(ValueError):
                self.pending.remove(fetch)
        if fetch._slot >= 0:
            self._released[fetch._slot].set()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for released in self._released:
            released.set()
        deadline = time.monotonic() + 1.0  # a read stuck on the network is left to exit
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self._resources.close()
            for buffer in self._buffers:
                with contextlib.suppress(BufferError):  # a view is still held: freed at exit
                    buffer.close()

    def _work(self, slot: int) -> None:
        view = memoryview(self._buffers[slot])
        while True:
            with self._lock:
                self._idle += 1
                while not (self._stopping or self._demand or self._ahead):
                    self._lock.wait()
                self._idle -= 1
                if self._stopping:
                    return
                fetch = (self._demand or self._ahead).popleft()
            fetch._slot = slot
            fetch.address = self._addresses[slot]
            self._released[slot].clear()
            started = time.monotonic()
            try:
                self._read(fetch, view)
            except Exception as err:  # any failure: the pages waited on are poisoned
                fetch.error = err.with_traceback(None)  # its frames hold this buffer
                fetch.failed_quickly = time.monotonic() - started < 0.1
            with self._lock:
                self._done.append(fetch)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake, b"\0")
            self._released[slot].wait()

    def _read(self, fetch: Fetch, view: memoryview) -> None:
        read_range(self.store, fetch.offset, view[: fetch.size])


def read_range(store: Store, offset: int, view: memoryview) -> None:
    """Fill ``view`` with store bytes [offset, offset + len(view)): every byte inside the
    store, or :class:`StoreError`; the last page's tail past the store's end is zeros."""
    inside = max(0, min(len(view), store.size - offset))
    got = store.read_into(offset, view)
    if got < inside:
        raise StoreError(
            errno.EIO,
            f"short read: {got} of {inside} bytes at offset {offset}, inside the store's "
            f"{store.size} bytes",
        )
    view[got:] = bytes(len(view) - got)

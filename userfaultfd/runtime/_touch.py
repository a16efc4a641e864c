"""Read one byte of every page of a lazily filled mapping: what ``uffd lazy`` measures.

A page the store cannot read is poisoned (never zero-filled), and reading it kills the reader
with SIGBUS, which no Python code survives. So the pages are read in a forked child, which notes
in shared memory the source offset of each page before it reads it: when the child dies of
SIGBUS, the parent knows which page it was and reads that page from the store itself to say why.
The child hands its result (or its exception) back through the same shared memory, pickled.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import mmap
import os
import pickle
import random
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, final

from .. import memory
from ..stores import Store, StoreError, open_store
from ._lazy import lazy, server_of
from ._policy import Policy
from ._server import DEFAULT_CPU
from ._stats import Stats

__all__ = ["PageUnreadableError", "TouchResult", "touch_pages"]

# (source offset of the page being read, or -1; length of the pickled result that follows)
_NOTE = struct.Struct("<qI")
_NOTE_SIZE = 1 << 16
_AHEAD = 8 << 20  # how far past the page a handler's read-ahead window may have reached


@final
@dataclass(frozen=True, slots=True)
class TouchResult:
    """What :func:`touch_pages` did."""

    #: Pages read (one byte each), and the seconds the reads took.
    pages: int
    seconds: float
    #: The handler's statistics after the last read.
    stats: Stats


class PageUnreadableError(OSError):
    """A page of the source could not be read: its memory raised SIGBUS. An OSError (EIO), as
    every error of the library is, so ``except OSError`` catches it; ``str()`` is the message
    alone."""

    def __init__(self, source: str, offset: int, reason: str) -> None:
        super().__init__(
            errno.EIO,
            f"page at offset {offset} of {source} could not be read ({reason}); "
            "the memory there raises SIGBUS",
        )
        #: The source, the page's offset in it, and why the store could not give it.
        self.source = source
        self.offset = offset
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[PageUnreadableError], tuple[str, int, str]]:
        return PageUnreadableError, (self.source, self.offset, self.reason)


def touch_pages(
    source: Any,
    *,
    policy: Policy | None = None,
    cpu: int | str | None = DEFAULT_CPU,
    order: Literal["seq", "random"] = "seq",
    pages: int | None = None,
    seed: int = 1,
    record: str | os.PathLike[str] | None = None,
    prefetch: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TouchResult:
    """Map ``source`` with :func:`lazy` and read one byte of each of its pages, in order
    (``order="seq"``) or shuffled with ``seed``; ``pages``: only the first this many.

    The reads happen in a forked child (see the module's note), so call this from a process
    with no other threads running. ``policy``, ``cpu``, ``record`` and ``prefetch`` go to
    :func:`serve`. ``progress(done, total)`` is called from the child now and then while it
    reads. Raises :class:`PageUnreadableError` naming the first page that could not be read
    and why, or what the child raised (a ``prefetch`` file that is not a working set, ...);
    a source that cannot be opened fails before the fork."""
    if pages is not None and pages < 1:
        raise ValueError(f"pages must be a positive number, not {pages}")
    store = open_store(source)  # a bad source fails here, before the fork
    note = mmap.mmap(-1, _NOTE_SIZE)  # MAP_SHARED: what the child was doing when it died
    try:
        _NOTE.pack_into(note, 0, -1, 0)
        options: dict[str, Any] = {"policy": policy, "cpu": cpu, "record": record,
                                   "prefetch": prefetch}  # fmt: skip
        touch = _Touch(store, options, order, pages, seed, progress, note)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            touch.run_and_exit()
        try:
            _, wait_status = os.waitpid(pid, 0)
        except BaseException:  # Ctrl-C: the child got it too; make sure it is gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        offset, length = _NOTE.unpack_from(note, 0)
        if length:
            kind, value = pickle.loads(note[_NOTE.size : _NOTE.size + length])
            if kind == "error":
                raise value
            result: TouchResult = value
            return result
        name = str(source) if not isinstance(source, Store) else type(source).__name__
        if os.WIFSIGNALED(wait_status):
            signum = os.WTERMSIG(wait_status)
            if signum == signal.SIGBUS and offset >= 0:
                raise PageUnreadableError(name, offset, _why_unreadable(store, offset))
            raise RuntimeError(
                f"the process touching {name} was killed by signal {signal.Signals(signum).name}"
            )
        raise RuntimeError(
            f"the process touching {name} exited with status "
            f"{os.WEXITSTATUS(wait_status)} and no result"
        )
    finally:
        note.close()
        if store is not source:
            store.close()


class _Touch:
    """The child's side: map, read, and hand the result back through ``note``."""

    def __init__(self, store: Store, options: dict[str, Any], order: str, pages: int | None,
                 seed: int, progress: Callable[[int, int], None] | None,
                 note: mmap.mmap) -> None:  # fmt: skip
        self.store, self.options, self.order, self.pages = store, options, order, pages
        self.seed, self.progress, self.note = seed, progress, note

    def run_and_exit(self) -> None:
        status = 1
        try:
            faulthandler.disable()  # a SIGBUS must end the child quietly: the parent reports it
            try:
                self._send(("result", self._touch()))
                status = 0
            except BaseException as err:  # the parent raises it, as if it were its own
                self._send(("error", err))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _touch(self) -> TouchResult:
        data = lazy(self.store, direct=False, **self.options)
        server = server_of(data)
        base = server.regions[0].offset  # a .npy's data starts after its header
        view = memoryview(data).cast("B")  # bytes, whatever the dtype and shape of a .npy
        page = memory.page_size()
        total = -(-len(view) // page)
        count = total if self.pages is None else min(self.pages, total)
        order = list(range(count))
        if self.order == "random":
            random.Random(self.seed).shuffle(order)
        step = max(1, count // 200)
        started = time.perf_counter()
        for done, index in enumerate(order, 1):
            _NOTE.pack_into(self.note, 0, base + index * page, 0)
            _ = view[index * page]  # the read is the point: it faults the page in
            if self.progress is not None and (done % step == 0 or done == count):
                self.progress(done, count)
        seconds = time.perf_counter() - started
        stats = server.stats()
        del view, data, server  # the child ends in os._exit: unmapping stops its handler now
        return TouchResult(count, seconds, stats)

    def _send(self, message: tuple[str, object]) -> None:
        try:
            pickled = pickle.dumps(message)
        except Exception:
            pickled = pickle.dumps(("error", RuntimeError(_describe(message[1]))))
        if len(pickled) > _NOTE_SIZE - _NOTE.size:
            pickled = pickle.dumps(("error", RuntimeError(_describe(message[1])[:4000])))
        offset, _ = _NOTE.unpack_from(self.note, 0)
        _NOTE.pack_into(self.note, 0, offset, len(pickled))
        self.note[_NOTE.size : _NOTE.size + len(pickled)] = pickled


def _describe(value: object) -> str:
    return f"{type(value).__name__}: {value}"


def _why_unreadable(store: Store, offset: int) -> str:
    """Why the store could not serve the page at ``offset``, as it says now: the page's own
    read, or else the first failing read in the read-ahead window the handler read with it."""
    page = memory.page_size()
    step = 16 * page
    buffer = memoryview(bytearray(step))
    starts = [offset, *range(offset + page, min(store.size, offset + _AHEAD), step)]
    for number, start in enumerate(starts):
        size = min(page if number == 0 else step, store.size - start)
        try:
            store.read_into(start, buffer[:size])
        except (StoreError, OSError) as err:
            reason = " ".join((err.strerror or str(err)).split()) or type(err).__name__
            if number == 0:
                return reason
            return f"the handler read it with bytes from {start} on, which failed: {reason}"
    return "the store failed while the handler read it"

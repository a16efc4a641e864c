"""serve(): memory in this process, filled on demand by a handler in another process.

Why another process, and why this order:
- A Python thread faulting on registered memory holds the GIL (see userfaultfd._core), so the
  handler is a separate process.
- The handler is forked *before* the memory is registered, and receives the uffd over a Unix
  socket (SCM_RIGHTS). Forking after registration would itself be a fork of registered memory:
  with EVENT_FORK requested, fork() would block until someone reads the Fork event.
- Once the supervisor holds the uffd, this process closes its own copy: a thread here blocked
  on a fault must never also be the only thing keeping the registration alive. The supervisor
  restarts a handler that dies (see _supervisor); stop() fills the remaining pages before both
  exit, so the memory stays right after them.
- The handler ignores SIGINT: Ctrl-C reaches the whole process group, and a handler that died
  of it would take the memory's contents with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from .. import memory
from .._closing import Closing
from .._core import Userfaultfd, supported_features
from .._flags import Feature, Mode
from .._forked import Channel
from ..stores import Store
from . import _stats
from ._policy import Adaptive, Policy
from ._stats import Stats, StatsBlock
from ._supervisor import supervise

__all__ = ["DEFAULT_CPU", "Region", "Server", "serve"]

#: Where the handler runs by default: "same" pins it and the calling thread to one CPU, where a
#: wakeup costs a few microseconds instead of tens across CPUs (benchmarks/runtime.py).
DEFAULT_CPU: int | str | None = "same"

_WANTED = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
    | Feature.MISSING_SHMEM | Feature.MISSING_HUGETLBFS | Feature.POISON
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Region:
    """A range of this process's memory, filled from ``store`` bytes starting at ``offset``."""

    address: int
    length: int
    offset: int = 0
    #: The mapping's page size (a huge page size for hugetlbfs memory); None: the base page.
    page_size: int | None = None

    @classmethod
    def of(cls, mapping: memory.Mapping, offset: int = 0) -> Region:
        huge = mapping.kind in ("hugetlb", "hugetlbfs")
        page = memory.huge_page_size() if huge else memory.page_size()
        return cls(mapping.address, mapping.length, offset, page)


class Server(Closing):
    """A running supervisor (``pid``) and its handler (``handler_pid``). ``stop()`` (or leaving
    the ``with`` block) fills the pages not filled yet and ends both; ``stats()`` reads the
    counters at any time."""

    def __init__(
        self,
        pid: int,
        control: int,
        stats: StatsBlock,
        regions: list[Region],
        pinned_thread: tuple[int, set[int]] | None = None,
    ) -> None:
        self.pid = pid
        self.regions = regions
        self._control = control
        self._stats = stats
        self._status: int | None = None
        self._pinned_thread = pinned_thread
        self._finalizer = weakref.finalize(self, _reap, pid, control, pinned_thread)

    def stats(self) -> Stats:
        return self._stats.snapshot()

    @property
    def handler_pid(self) -> int:
        """The process serving faults right now (the supervisor restarts it if it dies)."""
        return self._stats.value(_stats.HANDLER_PID)

    @property
    def alive(self) -> bool:
        if self._status is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self._status = status
        return self._status is None

    def stop(self, *, drain: bool = True, timeout: float = 600.0) -> Stats:
        """End the handler. With ``drain`` it first fills every page not filled yet, so the
        memory stays correct after it is gone; without, unfilled pages would read as zeros, so
        use ``drain=False`` only once the memory is unmapped or no longer read."""
        if self._status is None:
            try:
                os.write(self._control, b"d" if drain else b"x")
            except BrokenPipeError:
                pass
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.001)
            if self.alive:
                os.kill(self.pid, signal.SIGKILL)
                self._status = os.waitpid(self.pid, 0)[1]
                raise TimeoutError(f"the handler did not finish within {timeout} s; killed")
        self._finalizer.detach()
        os.close(self._control)
        _unpin(self._pinned_thread)
        return self.stats()

    def close(self) -> None:
        """stop() with its defaults, unless the server was stopped already."""
        if self._finalizer.alive:
            self.stop()

    def __repr__(self) -> str:
        return f"<Server pid={self.pid} {'running' if self._finalizer.alive else 'stopped'}>"


def _reap(pid: int, control: int, pinned_thread: tuple[int, set[int]] | None) -> None:
    """Finalizer: the Server was dropped without stop(). Tell the handler to fill what is left
    and exit (the memory may still be in use), without waiting for it."""
    try:
        os.write(control, b"d")
        os.close(control)
    except OSError:
        pass
    _unpin(pinned_thread)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def serve(
    regions: Iterable[Region | memory.Mapping],
    store: Store,
    *,
    policy: Policy | None = None,
    cpu: int | str | None = DEFAULT_CPU,
    batch: int = 64,
    buffer_bytes: int = 8 << 20,
) -> Server:
    """Register ``regions`` (MISSING) and serve their faults from ``store`` in a new process.

    ``policy`` chooses how many pages each fault fills (default :class:`Adaptive`). ``cpu``: an
    int pins the handler to that CPU; "same" pins the handler and the calling thread to the CPU
    the caller runs on; None leaves both to the scheduler.
    """
    wanted = [r if isinstance(r, Region) else Region.of(r) for r in regions]
    chosen = policy if policy is not None else Adaptive()
    resolved = [_checked(r, store) for r in wanted]
    _refuse_overlaps(resolved)
    handler_cpu, pinned_thread = _place(cpu)
    stats = StatsBlock()
    control_read, control_write = os.pipe2(os.O_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the supervisor, which starts the handler
        status = 1
        try:
            ours.close()
            os.close(control_write)
            supervise(Channel(theirs), control_read, store, chosen, stats, handler_cpu, batch,
                      buffer_bytes)  # fmt: skip
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    os.close(control_read)
    channel = Channel(ours)
    try:
        features = _WANTED & supported_features()
        with Userfaultfd(features) as uffd:
            for r in resolved:
                uffd.register(r.address, r.length, Mode.MISSING)
            channel.send(
                (int(features), [(r.address, r.length, r.offset, r.page_size) for r in resolved]),
                [uffd.fileno()],
            )
        ready, _ = channel.recv(timeout=30)
        if ready != "ready":
            raise RuntimeError(f"the handler did not start: {ready}")
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(control_write)
        _unpin(pinned_thread)
        raise
    finally:
        ours.close()
    return Server(pid, control_write, stats, resolved, pinned_thread)


def _refuse_overlaps(regions: list[Region]) -> None:
    ordered = sorted(regions, key=lambda r: r.address)
    for before, after in itertools.pairwise(ordered):
        if after.address < before.address + before.length:
            raise ValueError(
                f"regions 0x{before.address:x}+{before.length} and 0x{after.address:x}+"
                f"{after.length} overlap: each page must come from one place in the store"
            )


def _checked(region: Region, store: Store) -> Region:
    page = region.page_size or memory.page_size()
    if region.length <= 0 or region.address % page or region.length % page:
        raise ValueError(
            f"region 0x{region.address:x}+{region.length} must be a positive, {page}-byte "
            "aligned range"
        )
    # Past the end of the store, less than a page of zeros may pad the last page.
    if region.offset < 0 or region.offset + region.length - store.size >= page:
        raise ValueError(
            f"region needs store bytes [{region.offset}, {region.offset + region.length}), "
            f"but the store has {store.size} bytes"
        )
    return Region(region.address, region.length, region.offset, page)


_libc = ctypes.CDLL(None)


def _place(cpu: int | str | None) -> tuple[int | None, tuple[int, set[int]] | None]:
    """The handler's CPU. For "same", also pins the calling thread there, and returns its
    thread id and former affinity so stop() can put it back."""
    if isinstance(cpu, int):
        allowed = os.sched_getaffinity(0)
        if cpu not in allowed:
            raise ValueError(f"CPU {cpu} is not one this process may run on ({sorted(allowed)})")
        return cpu, None
    if cpu is None:
        return None, None
    if cpu != "same":
        raise ValueError(f'cpu must be an int, "same" or None, not {cpu!r}')
    here = int(_libc.sched_getcpu())
    thread = threading.get_native_id()
    before = os.sched_getaffinity(thread)
    os.sched_setaffinity(thread, {here})  # this thread only: Linux affinity is per thread
    return here, (thread, before)


def _unpin(pinned_thread: tuple[int, set[int]] | None) -> None:
    if pinned_thread is not None:
        with contextlib.suppress(OSError):  # the thread may have ended
            os.sched_setaffinity(*pinned_thread)

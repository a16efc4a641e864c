"""serve(): memory in this process, filled on demand by a handler in another process.

Why another process, and why this order:
- A Python thread faulting on registered memory holds the GIL (see userfaultfd._core), so the
  handler is a separate process (a daemon: see userfaultfd._handshake).
- The supervisor is started *before* the memory is registered, and receives the uffd over a
  Unix socket (SCM_RIGHTS). Forking after registration would itself be a fork of registered
  memory: with EVENT_FORK requested, fork() would block until someone reads the Fork event.
- Once the supervisor holds the uffd, this process closes its own copy: a thread here blocked
  on a fault must never also be the only thing keeping the registration alive. With the native
  extension, one copy goes to a native watchdog thread instead, which needs no GIL and settles
  every page if both daemons die (see _export): then nothing is left hanging either.
- The handler serves this process and every child it forks for as long as each lives (see
  _handler). So a ``Server`` acts only in the process that created it: in a forked child, its
  copy stops nothing, and dropping it or exiting changes nothing for anyone else. Dropping the
  Server without stop() only lets go of it: the handler goes on while the memory is mapped.
- EVENT_FORK needs CAP_SYS_PTRACE. Without it the kernel would give a forked child the range
  unregistered, and its missing pages would read zeros; so the ranges are marked MADV_DONTFORK
  instead: a child does not get them at all (touching them there is SIGSEGV, never zeros).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import final

from .. import _abi, _libc, memory
from .._closing import Closing
from .._core import Userfaultfd, supported_features
from .._errors import UserfaultfdPermissionError
from .._flags import Feature, Mode
from .._forked import Channel
from .._handshake import FirstMessage, Launched, launch
from .._native import native_available, native_module
from .._ready import readable
from ..stores import Store
from . import _stats
from ._export import MapExport
from ._policy import Adaptive, Policy
from ._reports import table_fd
from ._stats import Stats, StatsBlock
from ._supervisor import Options, supervise

__all__ = ["DEFAULT_CPU", "Region", "Server", "plan", "serve", "start"]

#: Where the handler runs by default: "same" pins it and the calling thread to one CPU, where a
#: wakeup costs a few microseconds instead of tens across CPUs (benchmarks/runtime.py).
DEFAULT_CPU: int | str | None = "same"

_WANTED = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
    | Feature.MISSING_SHMEM | Feature.MISSING_HUGETLBFS | Feature.POISON
)  # fmt: skip


@final
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
        return cls(mapping.address, mapping.length, offset, mapping.page_size)


@final
class Server(Closing):
    """A running supervisor (``pid``) and its handler (``handler_pid``). ``stop()`` (or leaving
    the ``with`` block) settles the pages not filled yet and ends both; ``stats()`` reads the
    counters at any time, from any process."""

    def __init__(
        self, launched: Launched, control: int, stats: StatsBlock, regions: list[Region],
        pinned_thread: int | None, *, paged: bool = False,
    ) -> None:  # fmt: skip
        self.pid = launched.pid
        self._paged = paged
        self.regions = regions
        self._launched = launched
        self._control = control
        self._stats = stats
        self._owner = os.getpid()
        self._pinned_thread = pinned_thread
        self._stopped = False
        self._finalizer = weakref.finalize(
            self, _let_go, self._owner, control, launched.pidfd, pinned_thread
        )

    def stats(self) -> Stats:
        return self._stats.snapshot()

    @property
    def handler_pid(self) -> int:
        """The process serving faults right now (the supervisor restarts it if it dies)."""
        return self._stats.value(_stats.HANDLER_PID)

    @property
    def alive(self) -> bool:
        """Whether the supervisor runs (the handler may outlive it, see stop())."""
        if self._stopped:
            return False
        return not readable([self._launched.pidfd], 0)

    def stop(self, *, drain: bool = True, timeout: float = 600.0) -> Stats:
        """Settle every page not filled yet, in this process and the children it forked, and
        end the handler: with ``drain``, fill them from the store; without, poison them (an
        access then gets SIGBUS). If the drain takes longer than ``timeout`` seconds, the pages
        left are poisoned and TimeoutError is raised. In a forked child, or once stopped, this
        only returns the stats."""
        if self._stopped or os.getpid() != self._owner:
            return self.stats()
        self._stopped = True
        self._finalizer.detach()
        try:
            self._tell(b"d" if drain else b"p")
            if not self._gone_within(timeout):
                self._tell(b"p")  # the supervisor kills the stuck handler and poisons
                if not self._gone_within(10.0):
                    self._launched.kill()
                    raise TimeoutError(
                        f"the handler did not finish within {timeout} s, nor poison the pages "
                        "left; killed"
                    )
                raise TimeoutError(
                    f"the handler did not finish within {timeout} s; the pages not filled were "
                    "poisoned"
                )
        finally:
            _let_go(self._owner, self._control, self._launched.pidfd, self._pinned_thread)
        return self.stats()

    def flush(self, *, timeout: float = 600.0) -> None:
        """Write every dirty page of an out-of-core array (``lazy(..., budget=...,
        writable=True)``) back to its source, and return once they are durable (fsync).
        Raises OSError (the errno of the write, e.g. ENOSPC) if a page could not be written
        back since the last flush: its bytes stay in memory, dirty, and go back at the next
        flush or eviction that succeeds. Only in the process that created the server."""
        if not self._paged:
            raise ValueError("flush() writes back an out-of-core array: lazy(..., budget=...)")
        if os.getpid() != self._owner:
            raise RuntimeError("flush() works in the process that made the array, not a child")
        if self._stopped:
            raise RuntimeError("the server is stopped: its dirty pages were written back then")
        asked = self._stats.value(_stats.FLUSH_ASKED) + 1
        self._stats.set(_stats.FLUSH_ASKED, asked)
        self._tell(b"f")
        deadline = time.monotonic() + timeout
        while self._stats.value(_stats.FLUSH_DONE) < asked:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the flush did not finish within {timeout} s")
            if not self.alive and not _running(self.handler_pid):
                raise OSError(errno.EIO, "the handler and supervisor are gone: the dirty pages "
                              f"cannot be written back ({self._stats.noted()})")  # fmt: skip
            time.sleep(0.0005)
        failed = self._stats.value(_stats.FLUSH_ERRNO)
        if failed:
            raise OSError(failed, f"{os.strerror(failed)}: {self._stats.noted()}")

    def fill_in_background(self) -> None:
        """Fill every page not filled yet, between faults (which are answered first); the
        handler ends once every page is in. Only in the process that created the server."""
        if not self._stopped and os.getpid() == self._owner:
            self._tell(b"b")

    def _tell(self, command: bytes) -> None:
        with contextlib.suppress(BrokenPipeError):  # supervisor and handler are both gone
            os.write(self._control, command)

    def _gone_within(self, timeout: float) -> bool:
        """Wait until the supervisor and the handler it ran have both exited."""
        deadline = time.monotonic() + timeout
        pidfd = self._launched.pidfd
        while not readable([pidfd], min(0.05, _left(deadline))):
            if time.monotonic() >= deadline:
                return False
        while _running(self.handler_pid):  # an orphaned handler finishing alone
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        """stop() with its defaults, unless the server was stopped already."""
        self.stop()

    def __repr__(self) -> str:
        return f"<Server pid={self.pid} {'stopped' if self._stopped else 'running'}>"


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _let_go(owner: int, control: int, pidfd: int, pinned_thread: int | None) -> None:
    """Release what the program holds of a server (the handler goes on while it is needed).
    Only in the process that created it: a forked child's copy holds nothing of its own."""
    if os.getpid() != owner:
        return
    for fd in (control, pidfd):
        with contextlib.suppress(OSError):
            os.close(fd)
    if pinned_thread is not None:
        _unpin(pinned_thread)


def serve(
    regions: Iterable[Region | memory.Mapping],
    store: Store,
    *,
    policy: Policy | None = None,
    cpu: int | str | None = DEFAULT_CPU,
    batch: int = 64,
    buffer_bytes: int = 8 << 20,
    user_mode_only: bool = False,
    fetches: int | None = None,
    record: str | os.PathLike[str] | None = None,
    prefetch: str | os.PathLike[str] | None = None,
    prefetch_timeout: float = 60.0,
) -> Server:
    """Register ``regions`` (MISSING) and serve their faults from ``store`` in a new process.

    ``policy`` chooses how many pages each fault fills (default :class:`Adaptive`). ``cpu``: an
    int pins the handler to that CPU; "same" pins the handler and the calling thread to the CPU
    the caller runs on; None leaves both to the scheduler. ``batch``: events read per read().
    ``buffer_bytes``: the handler's copy buffer. ``user_mode_only``: a uffd that handles faults
    from user space only (all an unprivileged process may have under
    vm.unprivileged_userfaultfd=0); a system call reading the memory then fails with EFAULT.
    ``fetches``: store reads kept in flight (default: what the store serves at once, e.g. 16
    for HTTP and S3, 1 for a local file). ``record``: the working set (each fill a fault asked
    for, in order), written to ``record + ".partial"`` and moved over ``record`` when the
    server ends (checked writable here); ``prefetch``: a file ``record`` wrote, whose fills are
    read and installed (without waking, one wake per run) before serve() returns, as REAP
    does: the program then runs on its working set without faults. After
    ``prefetch_timeout`` seconds serve() returns anyway, and the rest comes in behind the
    faults, which are served first.
    """
    wanted = [r if isinstance(r, Region) else Region.of(r) for r in regions]
    resolved, options = plan(wanted, store, policy=policy, batch=batch, buffer_bytes=buffer_bytes,
                             fetches=fetches, record=record, prefetch=prefetch,
                             prefetch_timeout=prefetch_timeout)  # fmt: skip

    def register() -> tuple[Userfaultfd, Feature]:
        uffd, features = open_uffd(user_mode_only)
        if Feature.EVENT_FORK not in features:
            for r in resolved:
                _dont_fork(r)
        for r in resolved:
            uffd.register(r.address, r.length, Mode.MISSING)
        return uffd, features

    return start(resolved, options, cpu, register, prefetch_timeout)


def plan(
    regions: list[Region], store: Store, *, policy: Policy | None, batch: int,
    buffer_bytes: int, fetches: int | None = None,
    record: str | os.PathLike[str] | None = None,
    prefetch: str | os.PathLike[str] | None = None, prefetch_timeout: float = 60.0,
) -> tuple[list[Region], Options]:  # fmt: skip
    """Check everything serve() is given before any process starts; the regions it will serve
    (page sizes resolved) and the supervisor's options."""
    if not regions:
        raise ValueError("serve() needs at least one region")
    chosen = Adaptive() if policy is None else policy
    if not isinstance(chosen, Policy):
        raise TypeError(f"policy must be Single(), Window(n) or Adaptive(), not {chosen!r}")
    if not isinstance(store, Store):
        raise TypeError(f"store must be a userfaultfd.stores.Store, not {type(store).__name__}")
    resolved = [_checked(r, store) for r in regions]
    _refuse_overlaps(resolved)
    largest_page = max(r.page_size or 0 for r in resolved)
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"batch (events read at once) must be a positive int, not {batch!r}")
    if not _is_int(buffer_bytes) or buffer_bytes < largest_page:
        raise ValueError(
            f"buffer_bytes must be an int of at least one page ({largest_page}), not "
            f"{buffer_bytes!r}"
        )
    if fetches is not None and (not _is_int(fetches) or not 1 <= fetches <= 1024):
        raise ValueError(f"fetches (reads in flight) must be an int in [1, 1024], not {fetches!r}")
    if isinstance(prefetch_timeout, bool) or not isinstance(prefetch_timeout, int | float) or (
        prefetch_timeout < 0
    ):  # fmt: skip
        raise ValueError(f"prefetch_timeout must be seconds >= 0, not {prefetch_timeout!r}")
    if prefetch is not None and not os.path.isfile(prefetch):
        raise FileNotFoundError(errno.ENOENT, "no working-set record to prefetch", str(prefetch))
    recording = None if record is None else _recording(os.path.abspath(record))
    options = Options(
        store=store, policy=chosen, stats=StatsBlock(), export=MapExport(), batch=batch,
        buffer_bytes=buffer_bytes,
        fetches=fetches, record=recording, record_into=None if record is None else
        os.path.abspath(record), prefetch=None if prefetch is None else os.path.abspath(prefetch),
    )  # fmt: skip
    options.stats.set(_stats.PREFETCHING, 1 if prefetch is not None else 0)
    return resolved, options


def _recording(record: str) -> str:
    """Where a recording into ``record`` goes until it ends (``record`` + ".partial"), made
    empty now: a path that cannot be written fails here, naming it, not in every handler."""
    if os.path.isdir(record):
        raise IsADirectoryError(errno.EISDIR, "record= names a directory, not a file", record)
    partial = record + ".partial"
    with open(partial, "wb"):  # FileNotFoundError (no such directory), PermissionError, ...
        pass
    if os.path.exists(record) and not os.access(record, os.W_OK):
        os.unlink(partial)
        raise PermissionError(errno.EACCES, "record= names a file that cannot be replaced", record)
    return partial


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def start(
    resolved: list[Region],
    options: Options,
    cpu: int | str | None,
    hand_over: Callable[[], tuple[Userfaultfd, Feature]],
    prefetch_timeout: float = 60.0,
    *,
    paged: bool = False,
) -> Server:
    """The one start-up sequence: start the supervisor, then ``hand_over()`` makes the uffd
    (registered, with its features), which goes to the supervisor over SCM_RIGHTS and is
    closed here; wait for "ready" (and a prefetch); on any failure, kill what started."""
    handler_cpu, pinned_thread = _place(cpu)
    control_read, control_write = os.pipe2(os.O_CLOEXEC)

    def body(channel: Channel) -> None:
        os.close(control_write)
        supervise(channel, control_read, options, handler_cpu)

    kept = -1  # the program's own descriptor of its uffd, for the watchdog (see _export)

    @contextlib.contextmanager
    def first(_pid: int) -> Iterator[FirstMessage]:
        nonlocal kept
        uffd, features = hand_over()
        if native_available():
            kept = os.dup(uffd.fileno())
        with uffd:  # closed once the supervisor holds it
            # The ranges go in a memfd: as a message, tens of thousands would not fit (EMSGSIZE).
            table, count = table_fd((r.address, r.length, r.offset, r.page_size or 0)
                                    for r in resolved)  # fmt: skip
            try:
                yield (int(features), count), [uffd.fileno(), table]
            finally:
                os.close(table)

    launched: Launched | None = None
    try:
        # The supervisor first: a fork of registered memory would wait for its Fork event.
        launched = launch(body, first, name="the handler", shed=_shed_registered_ranges,
                          hidden=_registered_kept_from_fork)  # fmt: skip
        os.close(control_read)
        control_read = -1
        if kept >= 0:
            _watch_daemons(kept, launched.pidfd, options, resolved)
            kept = -1  # the watchdog thread owns it now, and the export area
        else:
            options.export.release()  # (the daemons have their own copies)
        if options.prefetch is not None:
            _wait_for_prefetch(options.stats, launched, prefetch_timeout)
    except BaseException:
        if kept >= 0:
            os.close(kept)
            options.export.release()
        if launched is not None:
            launched.kill()
            launched.close()
        for fd in (control_read, control_write):
            if fd >= 0:
                os.close(fd)
        if pinned_thread is not None:
            _unpin(pinned_thread)
        raise
    launched.channel.sock.close()  # the supervisor closed its end after Ready
    return Server(launched, control_write, options.stats, resolved, pinned_thread, paged=paged)


def _watch_daemons(uffd: int, pidfd: int, options: Options, regions: list[Region]) -> None:
    """Hand ``uffd`` (the program's own descriptor) and a descriptor of the supervisor to the
    native watchdog thread, which settles the program's pages if both daemons die (_export)."""
    speedups = native_module()
    assert speedups is not None
    supervisor = os.dup(pidfd)
    try:
        speedups.watch(
            uffd, supervisor, options.export.address, options.export.length,
            [(r.address, r.length, r.page_size or memory.page_size()) for r in regions],
        )  # fmt: skip
    except BaseException:
        os.close(supervisor)
        raise


_RANGE_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
#: /proc/PID/smaps VmFlags of a range registered with a userfaultfd (missing, wp, minor).
_UFFD_FLAGS = frozenset({"um", "uw", "ui"})


@contextlib.contextmanager
def _registered_kept_from_fork() -> Iterator[None]:
    """Around the program's fork of a new server's middle process: the ranges this process has
    registered (earlier arrays) are marked MADV_DONTFORK, then given back to fork() after it.
    Copied, every one of them raised a FORK event its handler had to read before fork() could
    return, and the middle process became a source of every handler until it exited: each
    lazy() cost a round trip to every earlier handler, so the 120th array took 1.4 s here and
    the 300th never came (the issue asks for 10,000). MADV_DONTFORK raises no event. A fork by
    another thread of the program in this window gives a child without those ranges (SIGSEGV
    there, never zeros). Ranges already MADV_DONTFORK (VmFlags "dc") are left as they are."""
    hidden: list[tuple[int, int]] = []
    for start, end, flags in _registered_ranges():
        if "dc" not in flags:
            with contextlib.suppress(OSError):
                _libc.madvise(start, end - start, _abi.MADV_DONTFORK)
                hidden.append((start, end))
    try:
        yield
    finally:
        for start, end in hidden:
            with contextlib.suppress(OSError):
                _libc.madvise(start, end - start, _abi.MADV_DOFORK)


def _registered_ranges() -> list[tuple[int, int, set[str]]]:
    """(start, end, VmFlags) of every range of this process registered with a userfaultfd."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return []
    if not any(f" {flag}" in text for flag in _UFFD_FLAGS):
        return []
    found = []
    start = end = 0
    for line in text.splitlines():
        if (match := _RANGE_LINE.match(line)) is not None:
            start, end = int(match[1], 16), int(match[2], 16)
        elif line.startswith("VmFlags:") and _UFFD_FLAGS & (flags := set(line.split()[1:])):
            found.append((start, end, flags))
    return found


def _shed_registered_ranges() -> None:
    """In the launch's middle process, before it forks the server: mark every range this
    process has registered with a userfaultfd (earlier arrays) MADV_DONTFORK, so the server
    gets no copy of them. Else it would be served by their handlers too (a copy made by fork,
    adopted through the FORK event), each earlier handler would live as long as every later
    server, and a program exiting with 50 arrays saw its 100 daemons go one probe period at a
    time (8 s). Unmapping them instead would cost a round trip to each handler (the UNMAP event
    must be read); MADV_DONTFORK raises no event. The middle's own copies go when it exits."""
    for start, end, _flags in _registered_ranges():
        with contextlib.suppress(OSError):
            _libc.madvise(start, end - start, _abi.MADV_DONTFORK)
    _close_inherited_userfaultfds()


def _close_inherited_userfaultfds() -> None:
    """In the launch's middle process: close every userfaultfd it inherited from the program
    (the watchdog's descriptor of each earlier array: see _export). The new server needs none
    (its uffd is made after this fork and sent to it), and a copy kept here would outlive the
    array's own daemons: when both died, its watchdog would close its copy, and the range
    would stay registered with nobody serving it (a fault there hung, where it must be SIGBUS)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]":
                os.close(int(name))
        except (OSError, ValueError):
            pass


def _wait_for_prefetch(stats: StatsBlock, launched: Launched, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stats.value(_stats.PREFETCHING) and time.monotonic() < deadline:
        if readable([launched.pidfd], 0.002):
            return  # the supervisor ended: nothing will come


def open_uffd(user_mode_only: bool, extra: Feature = Feature(0)) -> tuple[Userfaultfd, Feature]:
    """A uffd with the features the runtime uses (and ``extra``) that this kernel and this
    process may have."""
    features = (_WANTED | extra) & supported_features()
    try:
        return Userfaultfd(features, user_mode_only=user_mode_only), features
    except UserfaultfdPermissionError:
        if Feature.EVENT_FORK not in features:
            raise
    features &= ~Feature.EVENT_FORK  # needs CAP_SYS_PTRACE; children then get no copy at all
    return Userfaultfd(features, user_mode_only=user_mode_only), features


def _dont_fork(region: Region) -> None:
    _libc.madvise(region.address, region.length, _abi.MADV_DONTFORK)


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


# -- placement ---------------------------------------------------------------------------------
# Pins are counted per thread: the first pin saves the thread's affinity and the last unpin
# puts it back, so servers stopped in any order leave the thread as it was.
_pins: dict[int, tuple[set[int], int]] = {}
_pins_lock = threading.Lock()


def _place(cpu: int | str | None) -> tuple[int | None, int | None]:
    """The handler's CPU. For "same", also pins the calling thread there; returns its id."""
    if isinstance(cpu, bool) or not (cpu is None or isinstance(cpu, int | str)):
        raise ValueError(f'cpu must be an int, "same" or None, not {cpu!r}')
    if isinstance(cpu, int):
        allowed = os.sched_getaffinity(0)
        if cpu not in allowed:
            raise ValueError(f"CPU {cpu} is not one this process may run on ({sorted(allowed)})")
        return cpu, None
    if cpu is None:
        return None, None
    if cpu != "same":
        raise ValueError(f'cpu must be an int, "same" or None, not {cpu!r}')
    here = _libc.sched_getcpu()
    thread = threading.get_native_id()
    with _pins_lock:
        before, count = _pins.get(thread, (os.sched_getaffinity(thread), 0))
        os.sched_setaffinity(thread, {here})  # this thread only: Linux affinity is per thread
        _pins[thread] = (before, count + 1)
    return here, thread


def _unpin(thread: int) -> None:
    with _pins_lock:
        if thread not in _pins:
            return
        before, count = _pins.pop(thread)
        if count > 1:
            _pins[thread] = (before, count - 1)
            return
        with contextlib.suppress(OSError):  # the thread may have ended
            os.sched_setaffinity(thread, before)

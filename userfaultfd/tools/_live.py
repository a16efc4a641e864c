"""Live snapshots: memory as it was at one instant, written while the program keeps writing.

Design note
-----------
This is QEMU's background snapshot, the use the seed's WP mode exists for:
- At the protect instant the whole region is write-protected (WP_UNPOPULATED covers pages never
  touched, PTE markers cover shmem pages that get zapped). From then on a page can change only
  after the handler lets a write through.
- The handler (another process: a writer blocked in a WP fault may hold the GIL) reads pages
  through /proc/PID/mem. On a WP fault it saves the page first, then lifts the protection, which
  wakes the writer: the saved bytes are the page as it was at the protect instant. A second
  thread copies the remaining pages in address order, each chunk saved before unprotected,
  skipping pages the fault thread saved meanwhile.
- Reading /proc/PID/mem needs ptrace access to the owner; the owner names the handler as its
  tracer (PR_SET_PTRACER), which Yama requires when ptrace_scope is 1.
- The owner keeps no uffd of its own: if the handler dies, the kernel drops the protection and
  writers go on (the snapshot fails, the program does not hang).
- The handler is a daemon started by the package's one fork-and-handshake (userfaultfd._handshake):
  a Ctrl-C or SIGTERM sent to the program's process group does not reach it, and the program's
  own ``os.wait()`` cannot reap it. Not being our child, it reports how it ended over the channel
  (``_DONE`` once the image is on disk, or ``Failed(reason)``); its pidfd shows when it ended,
  and an end with no report is a death (SIGKILL, the OOM killer).
- The image is written to DEST.partial (a URL's to a local temp file, uploaded to URL.partial)
  and renamed to DEST only when complete: a failed snapshot leaves nothing at DEST, and nothing
  behind. The destination is opened before the protect instant, so one that cannot be written
  fails at once, in the caller. A failure in either handler thread ends the handler, and
  ``wait()`` raises with the reason the handler sent. Only the process that took the snapshot
  puts the image in place: in a child it forked, ``wait()`` only waits for the handler to end.
  A ``wait()`` interrupted (Ctrl-C, SIGTERM made an exception) kills the handler and removes
  the image; a handler whose owner was killed fails its next read of the owner's memory and
  removes the image itself, as long as the name is still its image's.
- A page the program drops during the snapshot (MADV_DONTNEED) is zapped without a WP fault, so
  its saved content is whatever the handler read, possibly zeros. Don't drop pages during one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, final

from .. import _libc, memory
from .._closing import Closing
from .._core import Userfaultfd, supported_features
from .._counters import SharedCounters
from .._errors import ProcessGoneError
from .._events import PageFault
from .._flags import FaultFlag, Feature, Mode
from .._forked import Channel
from .._handshake import Failed, FirstMessage, Launched, Ready, launch
from .._location import is_url

__all__ = ["Snapshot", "SnapshotStats", "check_destination", "snapshot"]

_SAVED, _EARLY, _FAULTS = range(3)
#: The handler's report once the image is on disk (a failure is reported as ``Failed``).
_DONE = "done"
_PR_SET_PTRACER = 0x59616D61
_CHUNK_BYTES = 1 << 20


@final
@dataclass(frozen=True, slots=True)
class SnapshotStats:
    """What a snapshot did."""

    #: Pages saved so far, of ``pages`` in all.
    saved: int
    pages: int
    #: Pages saved ahead of the background copy because a write hit them.
    early: int
    #: WP faults served.
    faults: int
    #: How long writers waited in a WP fault (event read to write let through), microseconds.
    stall_p50_us: float
    stall_p90_us: float
    stall_p99_us: float
    #: Seconds from the protect instant to now (or to the end).
    seconds: float


class _WaitTimeoutError(TimeoutError):
    """wait()'s own timeout: the snapshot goes on (any other interruption abandons it)."""


def _cannot_write(dest: str, err: BaseException) -> OSError:
    if isinstance(err, NotImplementedError):
        reason = "its filesystem cannot write files"
    elif isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = str(err).strip() or type(err).__name__
    # The same kind of OSError (FileNotFoundError, PermissionError...), without "[Errno N]".
    kind = type(err) if isinstance(err, OSError) and type(err).__module__ == "builtins" else OSError
    failure = kind(f"cannot write the snapshot to {dest}: {reason}")
    failure.errno = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
    return failure


class _Destination:
    """Where an image goes. The handler writes ``local``; ``commit()`` makes it DEST (a rename,
    or an upload to URL.partial and a move), ``discard()`` removes every trace of it."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._fs: object | None = None
        try:
            if is_url(dest):
                import fsspec

                fs, self._path = fsspec.core.url_to_fs(dest)
                with fs.open(self._path + ".partial", "wb"):  # can we write there at all?
                    pass
                self._fs = fs
                fd, self.local = tempfile.mkstemp(prefix="uffd-snapshot-")
                os.close(fd)
            else:
                if os.path.isdir(dest):
                    raise IsADirectoryError(errno.EISDIR, "it is a directory")
                if os.path.exists(dest) and not os.access(dest, os.W_OK):
                    raise PermissionError(errno.EACCES, "it is not writable")
                self.local = dest + ".partial"
                os.close(os.open(self.local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o666))  # fmt: skip
        except Exception as err:
            self.discard()
            raise _cannot_write(dest, err) from err

    def commit(self) -> None:
        try:
            if self._fs is None:
                os.replace(self.local, self.dest)
                return
            fs: Any = self._fs
            with open(self.local, "rb") as source, fs.open(self._path + ".partial", "wb") as target:
                while block := source.read(_CHUNK_BYTES):
                    target.write(block)
            fs.mv(self._path + ".partial", self._path)
            os.unlink(self.local)
        except Exception as err:
            self.discard()
            raise _cannot_write(self.dest, err) from err

    def discard(self) -> None:
        """Best effort, and never raises: it runs while another error is being reported."""
        if hasattr(self, "local"):
            with contextlib.suppress(OSError):  # ENOENT; EROFS for a file never created
                os.unlink(self.local)
        if self._fs is not None:
            fs: Any = self._fs
            with contextlib.suppress(Exception):
                fs.rm(self._path + ".partial")


def check_destination(dest: str) -> None:
    """OSError (naming ``dest`` and why) unless a snapshot image can be written to ``dest``;
    leaves nothing behind. :func:`snapshot` checks it too; this is for failing before work."""
    _Destination(dest).discard()


@final
class Snapshot(Closing):
    """A snapshot in progress. ``wait()`` until it is written (leaving a ``with`` block waits
    too); ``stats()`` at any time."""

    def __init__(self, handler: Launched, counters: SharedCounters, pages: int, started: float,
                 destination: _Destination) -> None:  # fmt: skip
        #: The handler's pid (a daemon: not a child of this process).
        self.pid = handler.pid
        self.pages = pages
        self._handler = handler
        self._counters = counters
        self._started = started
        self._destination = destination
        self._owner = os.getpid()
        self._ended: float | None = None
        self._outcome: BaseException | bool = False  # True once committed; the error if failed

    @property
    def done(self) -> bool:
        """Whether the handler has ended (``wait()`` then puts the image in place)."""
        if self._ended is None and self._handler.ended:
            self._ended = time.monotonic()
        return self._ended is not None

    def stats(self) -> SnapshotStats:
        c = self._counters
        end = self._ended if self._ended is not None else time.monotonic()
        return SnapshotStats(
            c.value(_SAVED), self.pages, c.value(_EARLY), c.value(_FAULTS),
            c.percentile_us(0.5), c.percentile_us(0.9), c.percentile_us(0.99),
            end - self._started,
        )  # fmt: skip

    def wait(
        self, timeout: float | None = None, progress: Callable[[int, int], None] | None = None
    ) -> SnapshotStats:
        """Block until the image is complete; ``progress(saved, pages)`` is called as it grows.
        Raises RuntimeError if the handler failed, OSError if the image could not be put at its
        destination (nothing is left there either way), TimeoutError after ``timeout`` seconds
        (the snapshot goes on; wait again). Anything else that interrupts the wait (Ctrl-C, an
        exception raised by a signal handler or by ``progress``) abandons the snapshot: the
        handler is killed, nothing is left at the destination, and the exception goes on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.done:
                if progress is not None:
                    progress(self._counters.value(_SAVED), self.pages)
                if deadline is not None and time.monotonic() > deadline:
                    raise _WaitTimeoutError(f"the snapshot did not finish within {timeout} s")
                select.select([self._handler.pidfd], [], [], 0.005)
        except _WaitTimeoutError:
            raise
        except BaseException as err:  # Ctrl-C, SIGTERM made an exception, a failing progress
            self._abandon(err)
            raise
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        if self._outcome or os.getpid() != self._owner:  # a fork's copy: the owner commits
            return self.stats()
        try:
            failure = self._failure()
            if failure:
                raise RuntimeError(f"the snapshot handler failed: {failure}")
            self._destination.commit()
        except BaseException as err:
            self._destination.discard()
            self._outcome = err
            raise
        finally:
            self._handler.close()
        self._outcome = True
        if progress is not None:
            progress(self.pages, self.pages)
        return self.stats()

    def _abandon(self, err: BaseException) -> None:
        """Stop a snapshot the owner's wait() was interrupted in: the handler is killed and its
        image removed, so that nothing is left at DEST or DEST.partial when the program goes
        on to exit (the handler, a daemon, would otherwise finish an image nobody commits)."""
        if self._outcome is not False or os.getpid() != self._owner:
            return  # already settled; or a fork's copy, which only waits
        self._handler.kill()
        select.select([self._handler.pidfd], [], [], 5)  # gone before its image is removed
        self._destination.discard()
        self._handler.close()
        if self._ended is None:
            self._ended = time.monotonic()
        self._outcome = err

    def _failure(self) -> str:
        """Empty if the ended handler reported its image complete; else what went wrong."""
        try:
            report, _ = self._handler.channel.recv(timeout=0)
        except (OSError, EOFError):  # no report (TimeoutError is an OSError): it was killed
            return "it ended without a report (killed by a signal)"
        if isinstance(report, Failed):
            return report.reason
        return "" if report == _DONE else f"it reported {report!r}"

    def close(self) -> None:
        """:meth:`wait` for the image: what leaving a ``with`` block does."""
        self.wait()


def snapshot(
    region: memory.Mapping | tuple[int, int],
    dest: str,
    *,
    chunk_bytes: int = _CHUNK_BYTES,
) -> Snapshot:
    """Write-protect ``region`` of this process now, and write it to ``dest`` (a path, or an
    fsspec URL the image is uploaded to at the end) as it is at this instant, while this
    program keeps running. Returns at once; the image is complete after ``Snapshot.wait()``.

    Anonymous, shmem and hugetlbfs memory; the region must be writable.
    """
    if isinstance(region, memory.Mapping):
        address, length, page = region.address, region.length, region.page_size
    else:
        address, length = region
        page = memory.page_size()
    if length <= 0 or address % page or length % page:
        raise ValueError(f"region 0x{address:x}+{length} must be a positive {page}-aligned range")
    destination = _Destination(dest)  # fails here, in the caller, if dest cannot be written
    try:
        os.truncate(destination.local, length)
    except OSError as err:
        destination.discard()
        raise _cannot_write(dest, err) from err
    local = destination.local
    counters = SharedCounters(3)
    owner = os.getpid()

    def body(channel: Channel) -> None:
        try:
            _handler(channel, owner, local, counters, max(page, chunk_bytes))
        except BaseException as err:  # launch() or the owner's wait() reports it
            with contextlib.suppress(Exception):
                channel.send(Failed(f"{type(err).__name__}: {err}"))
            return
        channel.send(_DONE)

    wanted = Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM
    started = 0.0

    @contextlib.contextmanager
    def first(pid: int) -> Iterator[FirstMessage]:
        nonlocal started
        _allow_tracer(pid)
        with Userfaultfd(wanted & supported_features()) as uffd:  # the handler's copy only
            uffd.register(address, length, Mode.WP)
            uffd.writeprotect(address, length)  # the protect instant
            started = time.monotonic()
            yield (address, length, page), [uffd.fileno()]

    try:
        handler = launch(body, first, name="the snapshot handler")
    except BaseException:
        destination.discard()
        raise
    return Snapshot(handler, counters, length // page, started, destination)


def _allow_tracer(pid: int) -> None:
    """Let process ``pid`` read our memory: Yama (ptrace_scope 1) wants us to name it."""
    try:
        _libc.prctl(_PR_SET_PTRACER, pid)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: no Yama here, and nothing stands in the way
            raise


def _handler(channel: Channel, owner: int, path: str, counters: SharedCounters,
             chunk_bytes: int) -> None:  # fmt: skip
    (address, length, page), fds = channel.recv(timeout=30)
    uffd = Userfaultfd.from_fd(fds[0], Feature.PAGEFAULT_FLAG_WP)
    pages = length // page
    saved = bytearray(pages)
    view = memoryview(bytearray(chunk_bytes))
    mem = os.open(f"/proc/{owner}/mem", os.O_RDONLY | os.O_CLOEXEC)
    image = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    channel.send(Ready(os.getpid()))
    # Two threads: one answers WP faults at once, one copies the rest in order. The copies
    # release the GIL (preadv, pwrite), so a writer waits for one page, not for a chunk.
    lock = threading.Lock()
    failure: list[BaseException] = []

    def save_page(index: int) -> None:
        offset = index * page
        single = memoryview(bytearray(page))
        if os.preadv(mem, [single], address + offset) != page:
            raise OSError(f"short read of the owner's memory at 0x{address + offset:x}")
        os.pwrite(image, single, offset)

    def unprotect(first: int, last: int) -> None:
        uffd.writeprotect(address + first * page, (last - first) * page, protect=False)

    def serve_faults() -> None:
        try:
            while not finished.is_set():
                if not select.select([uffd], [], [], 0.05)[0]:
                    continue
                started = time.perf_counter_ns()
                for event in uffd.read_events(64):
                    if not isinstance(event, PageFault) or not event.flags & FaultFlag.WP:
                        continue
                    index = (event.address - address) // page
                    counters.add(_FAULTS)
                    with lock:
                        if not saved[index]:  # save first, then let the write through
                            save_page(index)
                            saved[index] = 1
                            counters.add(_SAVED)
                            counters.add(_EARLY)
                            unprotect(index, index + 1)
                        else:  # already saved and unprotected: the writer needs a wake only
                            uffd.wake(address + index * page, page)
                    counters.record_latency(time.perf_counter_ns() - started)
        except BaseException as err:  # reported by the main thread
            failure.append(err)

    finished = threading.Event()
    faults = threading.Thread(target=serve_faults, daemon=True)
    faults.start()
    try:
        per_chunk = max(1, chunk_bytes // page)
        for first in range(0, pages, per_chunk):
            last = min(pages, first + per_chunk)
            size = (last - first) * page
            # Still protected pages cannot change, so this read needs no lock; pages the fault
            # thread saves meanwhile are skipped below (their image bytes are already right).
            if os.preadv(mem, [view[:size]], address + first * page) != size:
                raise OSError(f"short read of the owner's memory at 0x{address + first * page:x}")
            with lock:
                for a, b in _runs(saved, first, last):
                    os.pwrite(image, view[(a - first) * page : (b - first) * page], a * page)
                    saved[a:b] = b"\x01" * (b - a)
                    counters.add(_SAVED, b - a)
                    unprotect(a, b)
            if failure:
                raise failure[0]
        if failure:
            raise failure[0]
        os.fsync(image)
        with contextlib.suppress(ProcessGoneError):
            uffd.unregister(address, length)
    except BaseException:
        # The owner may be gone (killed: SIGTERM, SIGKILL, the OOM killer), and nobody else
        # would remove the image. Only while the name is still this image's.
        _remove_if_same(path, os.fstat(image))
        raise
    finally:
        finished.set()
        faults.join()
        os.close(mem)
        os.close(image)
        uffd.close()


def _remove_if_same(path: str, image: os.stat_result) -> None:
    """Unlink ``path`` if it is still the file ``image`` (same device and inode)."""
    with contextlib.suppress(OSError):
        there = os.stat(path)
        if (there.st_dev, there.st_ino) == (image.st_dev, image.st_ino):
            os.unlink(path)


def _runs(flags: bytearray, first: int, last: int) -> list[tuple[int, int]]:
    """Runs [a, b) of zero flags within [first, last)."""
    runs = []
    index = first
    while index < last:
        if flags[index]:
            index += 1
            continue
        start = index
        while index < last and not flags[index]:
            index += 1
        runs.append((start, index))
    return runs

"""Watch a running program's lazy memory from outside: what ``uffd top PID`` shows.

Each server the runtime starts (serve(), lazy(), serve_adopted(), a CRIU restore's tasks) counts
what its handler does in a block of shared memory, a memfd named ``userfaultfd-stats-2``
(runtime/_stats.py): the program, its supervisor and its handler all map it. So another process
finds every server of a program by that name in ``/proc/PID/maps`` and reads the block's bytes,
through ``/proc/PID/map_files`` (which needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE) or else
``/proc/PID/mem`` (which needs the right to ptrace the program). Reading changes nothing in the
program: no signal, no message, no fault in its registered ranges (the block is not one).

A frame is one look: the counters of each server as they are, and the rates since the look
before (faults/s, filled bytes/s). Latency percentiles are since the server started (the block
keeps one histogram). What is resident is the program's, not a server's: the block does not say
which ranges a server has, so it is the resident set of every range registered with a uffd
(VmFlags ``um`` in ``/proc/PID/smaps``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from .._closing import Closing
from ..runtime import _stats
from ..runtime._stats import Stats, StatsBlock

__all__ = ["ServerView", "Top", "TopFrame", "rate"]


@final
@dataclass(frozen=True, slots=True)
class ServerView:
    """One server of the program, as one look found it."""

    #: The process answering its faults now (the supervisor starts another if it dies).
    handler_pid: int
    #: "serving" (its handler runs), "prefetching" (a recorded working set still coming in)
    #: or "ended" (the handler is gone: every page settled, or the server stopped).
    state: str
    #: Its counters, as :meth:`userfaultfd.runtime.Server.stats` would give them in the program.
    stats: Stats
    #: Faults read per second, and bytes filled per second, since the look before (None on
    #: the first look at this server).
    faults_per_s: float | None
    fill_bytes_per_s: float | None
    #: Where the block is: (device, inode) of its memfd, the same in every process mapping it.
    key: tuple[str, int]


@final
@dataclass(frozen=True, slots=True)
class TopFrame:
    """One look at a program."""

    pid: int
    #: Its command name (``/proc/PID/comm``).
    command: str
    #: Every server found, oldest first (by its block's inode: memfds are numbered as made).
    servers: tuple[ServerView, ...]
    #: Bytes of the program's ranges registered with a uffd (missing mode), and of those the
    #: bytes resident now.
    registered_bytes: int
    resident_bytes: int
    #: Seconds since the look before (None on the first).
    seconds: float | None


def rate(before: int | None, after: int, seconds: float | None) -> float | None:
    """``(after - before) / seconds``; None without a look before (or no time between)."""
    if before is None or seconds is None or seconds <= 0:
        return None
    return (after - before) / seconds


@final
class Top(Closing):
    """Looks at the servers of process ``pid``: :meth:`frame` each time. ProcessLookupError
    if there is no such process; :attr:`alive` says whether it still runs. ``proc``: where
    /proc is; ``clock``: seconds, for the rates."""

    def __init__(
        self, pid: int, *, proc: str = "/proc", clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"pid must be a positive int, not {pid!r}")
        self.pid = pid
        self._proc = os.path.join(proc, str(pid))
        self._clock = clock
        self._pidfd = os.pidfd_open(pid)  # ProcessLookupError; a reused pid is not this one
        self._before: dict[tuple[str, int], Stats] = {}
        self._at: float | None = None

    @property
    def alive(self) -> bool:
        """Whether the program still runs (its pidfd says so: a pid reused later does not)."""
        if self._pidfd < 0:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the program exits first: whether it still runs."""
        if self._pidfd >= 0:
            select.select([self._pidfd], [], [], seconds)
        return self.alive

    def frame(self) -> TopFrame:
        """Look now. ProcessLookupError once the program has exited."""
        now = self._clock()
        try:
            blocks = self._blocks()
            registered, resident = _registered(self._proc)
            command = _read_text(os.path.join(self._proc, "comm")).strip()
        except OSError:
            if self.alive:
                raise
            blocks, command = [], ""
        if not self.alive:  # what was read may be of a process on its way out
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} has exited")
        seconds = None if self._at is None else now - self._at
        views = []
        for key, block in blocks:
            stats = block.snapshot()
            before = self._before.get(key)
            views.append(ServerView(
                handler_pid=block.value(_stats.HANDLER_PID), state=_state(block, self._proc),
                stats=stats,
                faults_per_s=rate(before and before.faults, stats.faults, seconds),
                fill_bytes_per_s=rate(before and before.bytes, stats.bytes, seconds),
                key=key,
            ))  # fmt: skip
        self._before = {v.key: v.stats for v in views}
        self._at = now
        return TopFrame(self.pid, command, tuple(views), registered, resident, seconds)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _blocks(self) -> list[tuple[tuple[str, int], StatsBlock]]:
        """Every stats block the program maps, read now (one per memfd, however often mapped)."""
        found: list[tuple[tuple[str, int], StatsBlock]] = []
        seen: set[tuple[str, int]] = set()
        for line in _read_text(os.path.join(self._proc, "maps")).splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5] != f"/memfd:{_stats.NAME} (deleted)":
                continue
            key = (fields[3], int(fields[4]))
            if key in seen:
                continue
            seen.add(key)
            data = self._read_block(fields[0])
            if data is not None:
                found.append((key, StatsBlock.read(data)))
        return sorted(found, key=lambda item: item[0][1])

    def _read_block(self, span: str) -> bytes | None:
        """The block mapped at ``span`` ("start-end", as maps writes it), or None if it is gone."""
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            fd, offset = os.open(os.path.join(self._proc, "map_files", span), flags), 0
        except FileNotFoundError:
            return None  # unmapped since maps was read
        except PermissionError:  # no CAP_SYS_ADMIN: read the program's memory instead
            fd, offset = (
                os.open(os.path.join(self._proc, "mem"), flags),
                int(span[: span.index("-")], 16),
            )
        try:
            data = os.pread(fd, StatsBlock.LENGTH, offset)
        except OSError as err:
            if err.errno in (errno.EIO, errno.ESRCH):  # unmapped meanwhile, or the program exited
                return None
            raise
        finally:
            os.close(fd)
        return data if len(data) == StatsBlock.LENGTH else None


def _state(block: StatsBlock, proc: str) -> str:
    if not _running(os.path.join(os.path.dirname(proc), str(block.value(_stats.HANDLER_PID)))):
        return "ended"
    return "prefetching" if block.value(_stats.PREFETCHING) else "serving"


def _running(proc: str) -> bool:
    """Whether the process at ``proc`` (/proc/PID) lives and is not a zombie."""
    try:
        state = _read_text(os.path.join(proc, "stat")).rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _registered(proc: str) -> tuple[int, int]:
    """(bytes, resident bytes) of the ranges the program registered with a uffd for missing
    pages, from its smaps; (0, 0) if it cannot be read (the program exited)."""
    size = rss = 0
    vma_size = vma_rss = 0
    with contextlib.suppress(OSError):
        for line in _read_text(os.path.join(proc, "smaps")).splitlines():
            if line.startswith("Size:"):
                vma_size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                vma_rss = int(line.split()[1]) * 1024
            elif line.startswith("VmFlags:") and "um" in line.split()[1:]:
                size, rss = size + vma_size, rss + vma_rss
    return size, rss


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()

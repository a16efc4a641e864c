"""The supervisor: keeps a handler alive, so a crash costs a restart, never wrong data.

Design note
-----------
- The supervisor holds its own descriptor of the uffd. While any descriptor is open the kernel
  keeps the registration, so a handler that dies (a crash, SIGKILL, the OOM killer) leaves the
  faulting threads blocked, not reading zeros; the program itself holds none (see _server).
- It forks a new handler, then wakes every registered range (UFFDIO_WAKE): threads whose fault
  the dead handler had read but not answered fault again, and their events reach the new one.
  The new handler starts with an empty map of filled pages; copies onto pages already there
  fail with EEXIST, which the handler answers with a wake.
- If no handler can run (the store cannot be opened again, or handlers keep dying), it poisons
  every page not filled yet: accesses get SIGBUS, never zeros. Poison markers outlive the uffd.
- Commands from the program (fill the rest and exit, or exit) go through the supervisor, which
  repeats the last one to a handler it had to restart, so stop() is never lost.
- Handlers report every REMAP, REMOVE and UNMAP they read over a pipe, and the supervisor keeps
  the map of ranges up to date, so a restarted handler knows where the ranges are now and which
  pages the program dropped (those still read zeros). What a restart forgets: the uffds of the
  program's forked children (FORK events) die with the handler that held them.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass

from .._core import Userfaultfd
from .._errors import PageExistsError, ProcessGoneError, UserfaultfdError
from .._events import Remap, Remove, Unmap
from .._flags import Feature
from .._forked import Channel
from ..stores import Store
from . import _stats
from ._handler import Handler, RegionMap, RegionState, read_reports
from ._policy import Policy
from ._stats import StatsBlock

__all__ = ["supervise"]

#: A handler that cannot open its store exits with this status: restarting will not help.
STORE_GONE = 3
#: More restarts than this within RESTART_WINDOW seconds: give up and poison.
MAX_RESTARTS = 50
RESTART_WINDOW = 10.0


def supervise(
    channel: Channel,
    control: int,
    store: Store,
    policy: Policy,
    stats: StatsBlock,
    cpu: int | None,
    batch: int,
    buffer_bytes: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # handlers inherit it
    (features, regions), fds = channel.recv(timeout=30)
    uffd = Userfaultfd.from_fd(fds[0], Feature(features))
    # The ranges as the program has moved, dropped and unmapped them: handlers report every
    # REMAP, REMOVE and UNMAP they read, so a restarted one starts from where things are.
    ranges = RegionMap([RegionState(a, n, o, p, stream=0) for a, n, o, p in regions])
    command = b""  # the last command from the program, repeated to a restarted handler
    restarts: list[float] = []
    started = False
    while True:
        handler_pid, handler_control, reports = _start(
            uffd, ranges, store, policy, stats, batch, buffer_bytes, control, channel
        )
        stats.set(_stats.HANDLER_PID, handler_pid)
        if command:
            _tell(handler_control, command)
        if not started:
            channel.send("ready")
            started = True
        status = _watch(handler_pid, handler_control, control, reports, ranges)
        if status.command:
            command = status.command
        os.close(handler_control)
        os.close(reports)
        if status.exit_code == 0:
            return  # stopped as asked, or every served process is gone
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
        if status.exit_code == STORE_GONE or len(restarts) > MAX_RESTARTS:
            _poison_unfilled(uffd, ranges)
            return
        stats.add(_stats.RESTARTS)
        try:
            for region in ranges.regions:
                uffd.wake(region.address, region.length)  # faults the dead handler read
        except ProcessGoneError:
            return


@dataclass(frozen=True, slots=True)
class _Ended:
    exit_code: int
    #: The program's command the handler was given, if any.
    command: bytes


def _start(
    uffd: Userfaultfd,
    ranges: RegionMap,
    store: Store,
    policy: Policy,
    stats: StatsBlock,
    batch: int,
    buffer_bytes: int,
    control: int,
    channel: Channel,
) -> tuple[int, int, int]:
    """Fork a handler on a descriptor of its own; returns its pid, its command pipe and the
    pipe it reports range changes on."""
    command_read, command_write = os.pipe2(os.O_CLOEXEC)
    reports_read, reports_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(command_write)
            os.close(reports_read)
            os.close(control)
            channel.sock.close()
            try:
                opened = store.reopen()
            except OSError:
                os._exit(STORE_GONE)
            handler = Handler(opened, policy, stats, batch=batch, buffer_bytes=buffer_bytes,
                              report=reports_write)  # fmt: skip
            descriptor = Userfaultfd.from_fd(os.dup(uffd.fileno()), uffd.features)
            handler.add(descriptor, ranges.fresh())
            handler.run(command_read)
            status = 0
        finally:
            os._exit(status)
    os.close(command_read)
    os.close(reports_write)
    return pid, command_write, reports_read


def _watch(
    handler_pid: int, handler_control: int, control: int, reports: int, ranges: RegionMap
) -> _Ended:
    """Forward the program's commands to the handler, and follow its range reports, until
    the handler exits."""
    command = b""
    listening = True
    pending = bytearray()
    while True:
        ready = select.select([reports, control] if listening else [reports], [], [], 0.02)[0]
        if reports in ready:
            pending += os.read(reports, 1 << 16)
            for event in read_reports(pending):
                if isinstance(event, Remove | Unmap | Remap):
                    ranges.change(event)
        if control in ready:
            received = os.read(control, 1)
            command = received or b"x"  # EOF: the program is gone, so is the memory
            listening = False
            _tell(handler_control, command)
        pid, status = os.waitpid(handler_pid, os.WNOHANG)
        if pid:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            return _Ended(code, command)


def _tell(handler_control: int, command: bytes) -> None:
    with contextlib.suppress(BrokenPipeError):
        os.write(handler_control, command)


def _poison_unfilled(uffd: Userfaultfd, ranges: RegionMap) -> None:
    """Poison every page of the ranges that is still missing (SIGBUS on access, not zeros)."""
    for region in ranges.regions:
        page = region.page_size
        for at in range(region.address, region.end, page):
            try:
                uffd.poison(at, page)
            except PageExistsError:
                pass  # filled: its data is right
            except ProcessGoneError:
                return
            except UserfaultfdError:
                return  # POISON unsupported: leaving the pages blocked beats zeros

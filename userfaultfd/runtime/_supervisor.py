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
What a restart forgets: pages the program dropped (REMOVE events) are filled from the store
again rather than with zeros, and the uffds of the program's forked children (FORK events) die
with the handler that held them.
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
from .._flags import Feature
from .._forked import Channel
from ..stores import Store
from . import _stats
from ._handler import Handler
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
    command = b""  # the last command from the program, repeated to a restarted handler
    restarts: list[float] = []
    started = False
    while True:
        handler_pid, handler_control = _start(uffd, regions, store, policy, stats, batch,
                                              buffer_bytes, control, channel)  # fmt: skip
        stats.set(_stats.HANDLER_PID, handler_pid)
        if command:
            _tell(handler_control, command)
        if not started:
            channel.send("ready")
            started = True
        status = _watch(handler_pid, handler_control, control)
        if status.command:
            command = status.command
        os.close(handler_control)
        if status.exit_code == 0:
            return  # stopped as asked, or every served process is gone
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
        if status.exit_code == STORE_GONE or len(restarts) > MAX_RESTARTS:
            _poison_unfilled(uffd, regions)
            return
        stats.add(_stats.RESTARTS)
        try:
            for address, length, _offset, _page in regions:
                uffd.wake(address, length)  # faults the dead handler read: ask again
        except ProcessGoneError:
            return


@dataclass(frozen=True, slots=True)
class _Ended:
    exit_code: int
    #: The program's command the handler was given, if any.
    command: bytes


def _start(
    uffd: Userfaultfd,
    regions: list[tuple[int, int, int, int]],
    store: Store,
    policy: Policy,
    stats: StatsBlock,
    batch: int,
    buffer_bytes: int,
    control: int,
    channel: Channel,
) -> tuple[int, int]:
    """Fork a handler on a descriptor of its own; returns its pid and its command pipe."""
    command_read, command_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(command_write)
            os.close(control)
            channel.sock.close()
            try:
                opened = store.reopen()
            except OSError:
                os._exit(STORE_GONE)
            handler = Handler(opened, policy, stats, batch=batch, buffer_bytes=buffer_bytes)
            handler.add(Userfaultfd.from_fd(os.dup(uffd.fileno()), uffd.features), regions)
            handler.run(command_read)
            status = 0
        finally:
            os._exit(status)
    os.close(command_read)
    return pid, command_write


def _watch(handler_pid: int, handler_control: int, control: int) -> _Ended:
    """Forward the program's commands to the handler until the handler exits."""
    command = b""
    listening = True
    while True:
        ready = select.select([control] if listening else [], [], [], 0.02)[0]
        if ready:
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


def _poison_unfilled(uffd: Userfaultfd, regions: list[tuple[int, int, int, int]]) -> None:
    """Poison every page of the regions that is still missing (SIGBUS on access, not zeros)."""
    for address, length, _offset, page in regions:
        for at in range(address, address + length, page):
            try:
                uffd.poison(at, page)
            except PageExistsError:
                pass  # filled: its data is right
            except ProcessGoneError:
                return
            except UserfaultfdError:
                return  # POISON unsupported: leaving the pages blocked beats zeros

"""A forked process that owns registered memory, while the test process serves its faults.

The test process never touches registered memory itself: a fault there would block pytest with
the GIL held and no timeout could fire. Instead the target (a forked child) maps and registers
memory, hands the uffd over a Unix socket (SCM_RIGHTS, as real handlers receive it), and touches
the memory when told to. The test process reads events with a deadline, resolves them, and waits
for the target with a deadline too; a target that outlives its deadline is killed.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import pickle
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from userfaultfd import Event, Userfaultfd, memory

DEFAULT_TIMEOUT = 20.0
PAGE = memory.page_size()


def pattern(seed: int, size: int = PAGE) -> bytes:
    """``size`` bytes that differ for every ``seed``: a page nobody could mistake for another."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    return (block * (size // len(block) + 1))[:size]


class Channel:
    """Pickled messages with optional file descriptors, over a SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        socket.send_fds(self.sock, [pickle.dumps(obj)], list(fds))

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[Any, list[int]]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no message from the other process within {timeout} s")
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 16)
        if not data:
            raise EOFError("the other process closed the channel")
        return pickle.loads(data), fds


class TargetError(AssertionError):
    pass


class Target:
    """Run ``body(channel)`` in a forked child with a hard deadline.

    ``body`` may send anything picklable (and descriptors). An exception in the child is sent
    back as ("error", traceback) and re-raised here by :meth:`recv`.
    """

    def __init__(
        self, body: Callable[[Channel], None], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.timeout = timeout
        self.pid = os.fork()
        if self.pid == 0:  # the target
            parent_sock.close()
            status = 0
            try:
                faulthandler.disable()  # a SIGBUS test expects a plain death by signal
                signal.alarm(int(timeout) + 1)
                body(Channel(child_sock))
            except BaseException:
                status = 1
                try:
                    Channel(child_sock).send(("error", traceback.format_exc()))
                except OSError:
                    pass
            finally:
                os._exit(status)
        child_sock.close()
        self.channel = Channel(parent_sock)
        self.status: int | None = None

    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.channel.send(obj, fds)

    def recv(self, timeout: float | None = None) -> tuple[Any, list[int]]:
        obj, fds = self.channel.recv(self.timeout if timeout is None else timeout)
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "error":
            raise TargetError(f"the target process failed:\n{obj[1]}")
        return obj, fds

    def recv_uffd(self, timeout: float | None = None) -> tuple[Any, Userfaultfd]:
        """Receive a message that carries a uffd as its first descriptor."""
        obj, fds = self.recv(timeout)
        assert fds, "the target sent no descriptor"
        for extra in fds[1:]:
            os.close(extra)
        return obj, Userfaultfd.from_fd(fds[0])

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the target to exit; returns its wait status. Kills it after ``timeout``."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return status
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                self.status = os.waitpid(self.pid, 0)[1]
                raise TimeoutError(f"target process {self.pid} did not finish in time; killed")
            time.sleep(0.005)

    def exit_code(self, timeout: float | None = None) -> int:
        status = self.wait(timeout)
        assert os.WIFEXITED(status), f"target died by signal {os.WTERMSIG(status)}"
        return os.WEXITSTATUS(status)

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.status = os.waitpid(self.pid, 0)[1]
        self.channel.sock.close()


def next_events(uffd: Userfaultfd, timeout: float = 5.0) -> list[Event]:
    """The next batch of events, waiting at most ``timeout`` seconds for one."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no userfaultfd event within {timeout} s")
        ready, _, _ = select.select([uffd], [], [], remaining)
        if ready:
            events = uffd.read_events()
            if events:
                return events


def next_event(uffd: Userfaultfd, timeout: float = 5.0) -> Event:
    """Exactly one event (the test expects a single pending one)."""
    events = next_events(uffd, timeout)
    assert len(events) == 1, f"expected one event, got {events}"
    return events[0]

"""A forked child with a deadline, and a channel to it: how faults are taken out of harm's way.

A process that touches registered memory must never be the one serving its faults (see the design
note in _core). The checks, and the tests, fork a child that maps, registers and touches memory,
and hand its uffd back over a Unix socket (SCM_RIGHTS, as real handlers receive it); the parent
serves with a deadline on every wait. The child arms SIGALRM, whose default action kills it, so
a child stuck in a fault that nobody serves still ends.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from ._closing import Closing
from ._core import Userfaultfd
from ._events import Event
from ._ready import readable

__all__ = ["Channel", "ChildFailedError", "Forked", "next_events"]

DEFAULT_TIMEOUT = 20.0


class Channel:
    """Pickled messages with optional file descriptors, over a SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        socket.send_fds(self.sock, [pickle.dumps(obj)], list(fds))

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[Any, list[int]]:
        ready = readable([self.sock.fileno()], timeout)
        if not ready:
            raise TimeoutError(f"no message from the other process within {timeout} s")
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 16)
        if not data:
            raise EOFError("the other process closed the channel")
        return pickle.loads(data), fds


class ChildFailedError(RuntimeError):
    """The forked child raised; the message carries its traceback."""


class Forked(Closing):
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
            raise ChildFailedError(f"the child process failed:\n{obj[1]}")
        return obj, fds

    def recv_uffd(self, timeout: float | None = None) -> tuple[Any, Userfaultfd]:
        """Receive a message that carries a uffd as its first descriptor."""
        obj, fds = self.recv(timeout)
        if not fds:
            raise ChildFailedError("the child sent no descriptor")
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
                raise TimeoutError(f"child process {self.pid} did not finish in time; killed")
            time.sleep(0.005)

    def exit_code(self, timeout: float | None = None) -> int:
        status = self.wait(timeout)
        if not os.WIFEXITED(status):
            raise ChildFailedError(f"the child process died by signal {os.WTERMSIG(status)}")
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        """Kill the child if it still runs, reap it, close the channel. Idempotent."""
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
        ready = readable([uffd.fileno()], remaining)
        if ready:
            events = uffd.read_events()
            if events:
                return events

"""Start a server process and hand it work: the one fork-and-handshake sequence of the runtime.

The server is a daemon, not a child of this process: an intermediate child calls setsid() and
forks it, then exits at once. So
- signals sent to the program's process group (Ctrl-C, a closed terminal, a service manager's
  SIGTERM) do not reach it: it runs in a session of its own;
- it leaves no zombie when the program forgets it, and ``os.wait()`` in the program never reaps
  it by surprise: init does;
- the program watches it through a pidfd, which works for any process; waitpid cannot give its
  exit status, so a server that has an outcome to report sends it over the channel;
- it does not hold the program's standard streams: it may outlive the program by a moment (or
  serve its children for long), and a pipe it kept open would never reach end-of-file for
  whoever reads the program's output. Standard error stays when it is a terminal or a file,
  for the handler's log lines.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .._forked import Channel

__all__ = ["Launched", "launch"]


@dataclass(frozen=True, slots=True)
class Launched:
    """A server process: its pid, a pidfd for it, its process group, and the channel to it."""

    pid: int
    pidfd: int
    group: int
    channel: Channel

    @property
    def ended(self) -> bool:
        """Whether the server has exited (its pidfd turns readable then)."""
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def kill(self) -> None:
        """SIGKILL the server and everything it started (they share its process group)."""
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap()

    def reap(self) -> None:
        """Wait for the short-lived middle process, this process's child, to finish exiting.
        Called once the handshake with the server is done, so that its exit (the teardown of a
        copy of the program's address space: milliseconds for a large one) overlaps the
        server's start instead of delaying it. Idempotent."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.group, 0)  # setsid made the middle process's pid the group id


def _let_go_of_streams() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    try:
        mode = os.fstat(2).st_mode
    except OSError:  # closed
        mode = stat.S_IFIFO
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        os.dup2(null, 2)
    os.close(null)


def launch(body: Callable[[Channel], None], timeout: float = 30.0) -> Launched:
    """Run ``body(channel)`` in a new daemon process; returns once it runs. Call
    :meth:`Launched.reap` after the handshake (or :meth:`Launched.kill`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    middle = os.fork()
    if middle == 0:
        status = 1
        try:
            ours.close()
            os.setsid()  # a new session and process group, led by this short-lived process
            _let_go_of_streams()
            pid = os.fork()
            if pid == 0:
                try:
                    body(Channel(theirs))
                    status = 0
                finally:
                    os._exit(status)
            Channel(theirs).send(("pid", pid))
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    channel = Channel(ours)
    try:
        (what, pid), _ = channel.recv(timeout=timeout)
        if what != "pid":
            raise RuntimeError(f"the server process did not start: {what}")
        # The server waits for the program's first message, so it is alive here and its pid
        # cannot have been reused.
        pidfd = os.pidfd_open(pid)
    except BaseException:
        ours.close()
        with_group = middle  # setsid made the middle process's pid the group id
        try:
            os.killpg(with_group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with contextlib.suppress(ChildProcessError):
            os.waitpid(middle, 0)
        raise
    return Launched(pid, pidfd, middle, channel)  # the caller reaps the middle process

"""Start a server process and hand it its work: the one fork-and-handshake of the package.

The runtime's supervisor and the tools' snapshot handler both start this way (:func:`launch`):
fork the server as a daemon; send it a first message with descriptors (SCM_RIGHTS: a uffd);
it answers :class:`Ready` once it holds what it needs, or :class:`Failed` with the reason. On
any failure (a Failed, an exit, no answer in time, an error while making the first message) the
server and everything it started are killed, and its pidfd and channel closed, before the error
reaches the caller.

Design note
-----------
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
  for the server's log lines;
- the program reaps the short-lived middle process (its child) only after the handshake, so
  that the middle's exit (the teardown of a copy of the program's address space: milliseconds
  for a large one) overlaps the server's start instead of delaying it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, final

from ._forked import Channel
from ._ready import readable

__all__ = ["Failed", "FirstMessage", "Launched", "Ready", "launch"]

#: What the program sends first: a picklable message and the descriptors that go with it.
FirstMessage = tuple[Any, list[int]]


@final
@dataclass(frozen=True, slots=True)
class Ready:
    """The server's answer to the first message: it holds what it needs and runs."""

    pid: int


@final
@dataclass(frozen=True, slots=True)
class Failed:
    """The server's answer to the first message: it cannot run, and why."""

    reason: str


@final
@dataclass(frozen=True, slots=True)
class _Forked:
    """The middle process's one message: the pid of the server it forked."""

    pid: int


@final
@dataclass(frozen=True, slots=True)
class Launched:
    """A server process that answered Ready: its pid, a pidfd for it, its process group, and
    the channel to it (left open for the caller's protocol)."""

    pid: int
    pidfd: int
    group: int
    channel: Channel

    @property
    def ended(self) -> bool:
        """Whether the server has exited (its pidfd turns readable then)."""
        return bool(readable([self.pidfd], 0))

    def kill(self) -> None:
        """SIGKILL the server and everything it started (they share its process group, which
        outlives its leader, the middle process, reaped by launch())."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group, signal.SIGKILL)

    def close(self) -> None:
        """Close the pidfd and the channel (the server runs on). Not idempotent: once."""
        os.close(self.pidfd)
        self.channel.sock.close()


def _kill_group(middle: int) -> None:
    """SIGKILL the group the middle process leads (setsid made its pid the group id), then
    reap the middle process, this process's child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(middle, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(middle, 0)


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


def launch(
    body: Callable[[Channel], None],
    first: Callable[[int], AbstractContextManager[FirstMessage]],
    *,
    name: str,
    timeout: float = 30.0,
    shed: Callable[[], None] | None = None,
    hidden: Callable[[], AbstractContextManager[object]] | None = None,
) -> Launched:
    """Run ``body(channel)`` in a new daemon process and hand it its work.

    ``first(pid)`` (called once the server runs, with its pid) is entered to make the first
    message and its descriptors, which are sent while it is open (so what owns them closes
    them on the way out, sent or not). ``body`` receives that message (``channel.recv()``)
    and answers ``Ready(os.getpid())`` or ``Failed(reason)``. Returns once Ready arrived;
    otherwise kills the server, closes everything, and raises: RuntimeError naming ``name``
    for a Failed answer or a server that ended without one, TimeoutError after ``timeout``
    seconds of silence, or what ``first`` raised. ``shed``: run in the middle process before
    it forks the server, to drop what the server must not inherit. ``hidden()``: entered around
    this process's own fork, to keep what the middle process must not even see."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with hidden() if hidden is not None else contextlib.nullcontext():
        middle = os.fork()
    if middle == 0:
        status = 1
        try:
            ours.close()
            os.setsid()  # a new session and process group, led by this short-lived process
            _let_go_of_streams()
            if shed is not None:
                shed()
            pid = os.fork()
            if pid == 0:
                try:
                    body(Channel(theirs))
                    status = 0
                finally:
                    os._exit(status)
            Channel(theirs).send(_Forked(pid))
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    channel = Channel(ours)
    pidfd = -1
    try:
        forked, _ = channel.recv(timeout=timeout)
        if not isinstance(forked, _Forked):
            raise RuntimeError(f"{name} did not start: the middle process sent {forked!r}")
        # The server waits for the first message, so it is alive here and its pid cannot have
        # been reused.
        pidfd = os.pidfd_open(forked.pid)
        with first(forked.pid) as (message, fds):
            channel.send(message, fds)
        try:
            answer, extra = channel.recv(timeout=timeout)
        except EOFError:
            raise RuntimeError(f"{name} did not start: it exited before it was ready") from None
        for fd in extra:
            os.close(fd)
        if isinstance(answer, Failed):
            raise RuntimeError(f"{name} did not start: {answer.reason}")
        if answer != Ready(forked.pid):
            raise RuntimeError(f"{name} did not start: it answered {answer!r}, not Ready")
    except BaseException:
        _kill_group(middle)
        if pidfd >= 0:
            os.close(pidfd)
        ours.close()
        raise
    with contextlib.suppress(ChildProcessError):
        os.waitpid(middle, 0)  # the middle process exited long ago, or is exiting now
    return Launched(forked.pid, pidfd, middle, channel)

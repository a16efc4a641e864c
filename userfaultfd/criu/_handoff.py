"""The restore's side of a lazy restore: the hand-off socket criu restore connects to.

Read in criu/uffd.c (send_uffd, ud_open, lazy_pages_summary): the daemon listens on
``lazy-pages.socket`` in the restore's work dir before the restore starts; the restore makes one
SOCK_STREAM connection and sends, for each task of pstree.img in order, a native-endian int32
pid and then that task's uffd as SCM_RIGHTS on a 1-byte payload (a zombie: a negative pid and
no descriptor). When the whole restore is done it sends the u32 ``RSTF`` and closes; a daemon
that closed its end before would fail the restore.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass

from .._flags import Feature

__all__ = ["RESTORE_FINISHED", "Handoff", "TaskUffd", "adopted_features"]

#: "RSTF" read as a little-endian u32: the restore is done (criu/uffd.c).
RESTORE_FINISHED = 0x52535446
_INT = struct.Struct("=i")
#: What criu's restorer enables (criu/uffd.c, NEED_UFFD_API_FEATURES), if fdinfo says nothing.
CRIU_FEATURES = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_UNMAP | Feature.EVENT_REMOVE
)


@dataclass(frozen=True, slots=True)
class TaskUffd:
    """One task handed over: its pid (negative: a zombie, no uffd) and its uffd descriptor."""

    pid: int
    fd: int | None


def adopted_features(fd: int, proc: str = "/proc") -> Feature:
    """The features UFFDIO_API enabled on ``fd``, as the kernel shows them in fdinfo
    (``API:\\t<api>:<features>:<ioctls>``); CRIU's known set where fdinfo lacks the line."""
    try:
        with open(f"{proc}/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError:
        return CRIU_FEATURES
    match = re.search(r"^API:\s*[0-9a-fA-F]+:([0-9a-fA-F]+):", text, re.MULTILINE)
    return Feature(int(match[1], 16)) if match else CRIU_FEATURES


class Handoff:
    """A listening hand-off socket at ``path`` (a stale socket there is replaced)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(path) or os.path.islink(path):
                _remove_stale(path)
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError as err:
            self._listener.close()
            reason = err.strerror or str(err)
            raise OSError(err.errno or errno.EINVAL, f"cannot listen on {path}: {reason}") from err
        self._connection: socket.socket | None = None
        self._pending = b""

    def accept(self, timeout: float | None = None) -> None:
        """Wait for the restore to connect."""
        if not select.select([self._listener], [], [], timeout)[0]:
            raise TimeoutError(f"no criu restore connected to {self.path} within {timeout} s")
        self._connection, _ = self._listener.accept()
        self._listener.close()
        with_unlinked(self.path)

    def task(self, timeout: float | None = None) -> TaskUffd:
        """The next task's pid and uffd."""
        data, fds = self._read(4, timeout, "a task's pid")
        (pid,) = _INT.unpack(data)
        for extra in fds:  # nothing comes with the pid itself
            os.close(extra)
        if pid < 0:
            return TaskUffd(pid, None)
        _, fds = self._read(1, timeout, f"the uffd of task {pid}")
        if not fds:
            raise RuntimeError(f"criu restore sent task {pid} without its userfaultfd")
        for extra in fds[1:]:
            os.close(extra)
        return TaskUffd(pid, fds[0])

    def finished(self, timeout: float | None = None) -> None:
        """Wait for RSTF: every task restored. RuntimeError when the restore hung up first."""
        try:
            data, fds = self._read(4, timeout, "the restore-finished word (RSTF)")
        except EOFError:
            raise RuntimeError(
                "criu restore hung up before it finished (no RSTF): the restore failed"
            ) from None
        for extra in fds:
            os.close(extra)
        (word,) = struct.unpack("=I", data)
        if word != RESTORE_FINISHED:
            raise RuntimeError(f"criu restore sent 0x{word:08x} where RSTF (0x52535446) belongs")

    def _read(self, size: int, timeout: float | None, what: str) -> tuple[bytes, list[int]]:
        assert self._connection is not None, "accept() first"
        deadline = None if timeout is None else time.monotonic() + timeout
        data = b""
        fds: list[int] = []
        while len(data) < size:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                raise TimeoutError(f"criu restore sent no {what} within {timeout} s")
            chunk, got, _flags, _addr = socket.recv_fds(self._connection, size - len(data), 4)
            fds.extend(got)
            if not chunk:
                for fd in fds:
                    os.close(fd)
                raise EOFError(f"criu restore closed the hand-off socket before {what}")
            data += chunk
        return data, fds

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()
        if self._connection is not None:
            self._connection.close()
        with_unlinked(self.path)


def with_unlinked(path: str) -> None:
    """Remove the socket file (nobody else connects: the restore makes one connection)."""
    try:
        if os.path.exists(path) and _is_socket(path):
            os.unlink(path)
    except OSError:
        pass


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)


def _remove_stale(path: str) -> None:
    if not _is_socket(path):
        raise OSError(errno.EEXIST, "it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, "a daemon is listening there")

"""The one fork-and-handshake (userfaultfd._handshake): Ready returns a running daemon; any
failure kills the server and closes every descriptor before the error reaches the caller."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from userfaultfd._forked import Channel
from userfaultfd._handshake import Failed, FirstMessage, Ready, launch

pytestmark = pytest.mark.timeout(60)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` has ended (reaped by init, or a zombie of it) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class First:
    """A first message carrying one end of a pipe; remembers the pid it was called with and
    whether the pipe end it owns was closed."""

    def __init__(self, fail: bool = False) -> None:
        self.pid = -1
        self.fail = fail
        self.closed = False

    @contextlib.contextmanager
    def __call__(self, pid: int) -> Iterator[FirstMessage]:
        self.pid = pid
        if self.fail:
            raise ValueError("cannot make the first message")
        read, write = os.pipe()
        os.close(write)
        try:
            yield ("work", 42), [read]
        finally:
            os.close(read)
            self.closed = True


def test_ready_returns_a_daemon_that_holds_the_descriptors() -> None:
    def body(channel: Channel) -> None:
        message, fds = channel.recv()
        channel.send(Ready(os.getpid()))
        channel.send((message, len(fds), os.getppid() != parent, os.getsid(0) != session))

    parent, session = os.getpid(), os.getsid(0)
    first = First()
    before = open_fds()
    launched = launch(body, first, name="the test server")
    try:
        assert launched.pid == first.pid, "Launched names another process than first() saw"
        assert first.closed, "the first message's descriptor stayed open after the handshake"
        report, _ = launched.channel.recv(timeout=10)
        assert report == (("work", 42), 1, True, True), (
            f"the server got (message, descriptors, not our child, another session) = {report}"
        )
        with pytest.raises(ChildProcessError):
            os.waitpid(launched.group, os.WNOHANG)  # the middle process was reaped
    finally:
        launched.kill()
        launched.close()
    assert gone(first.pid), f"server {first.pid} still runs after kill()"
    assert open_fds() == before, "descriptors leaked"


@pytest.mark.parametrize("answer", ["failed", "exit", "wrong"])
def test_a_server_that_is_not_ready_is_killed_and_closed(answer: str) -> None:
    def body(channel: Channel) -> None:
        channel.recv()
        if answer == "failed":
            channel.send(Failed("the store is gone"))
            time.sleep(60)  # must be killed, not left running
        elif answer == "wrong":
            channel.send("ready")  # the old shape of the answer
            time.sleep(60)

    expected = {
        "failed": "the test server did not start: the store is gone",
        "exit": "the test server did not start: it exited before it was ready",
        "wrong": "the test server did not start: it answered 'ready', not Ready",
    }[answer]
    first = First()
    before = open_fds()
    with pytest.raises(RuntimeError) as raised:
        launch(body, first, name="the test server")
    assert str(raised.value) == expected
    assert gone(first.pid), f"server {first.pid} still runs after a failed handshake"
    assert first.closed, "the first message's descriptor was left open"
    assert open_fds() == before, "descriptors leaked"


def test_a_failure_making_the_first_message_kills_the_server() -> None:
    def body(channel: Channel) -> None:
        channel.recv(timeout=60)

    first = First(fail=True)
    before = open_fds()
    with pytest.raises(ValueError, match="cannot make the first message"):
        launch(body, first, name="the test server")
    assert first.pid > 0, "first() was never called"
    assert gone(first.pid), f"server {first.pid} still runs after first() failed"
    assert open_fds() == before, "descriptors leaked"


def test_silence_is_a_timeout_and_kills_the_server() -> None:
    def body(channel: Channel) -> None:
        channel.recv()
        time.sleep(60)

    first = First()
    with pytest.raises(TimeoutError):
        launch(body, first, name="the test server", timeout=0.5)
    assert gone(first.pid), f"server {first.pid} still runs after the timeout"

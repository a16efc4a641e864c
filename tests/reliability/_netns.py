"""Two network namespaces joined by a veth pair: a server host and a client host on one machine.

Traffic between them never leaves the machine: the /24 below exists only inside the two
namespaces a test makes, and :func:`pair` deletes them (and kills what runs in them) however the
test ends. A namespace is only named once ``ip netns add`` made it, so teardown never touches a
namespace it did not create.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: The test subnet, private and used only inside namespaces made here.
SERVER_ADDRESS = "10.213.0.1"
CLIENT_ADDRESS = "10.213.0.2"
_PREFIX = 24

_counter = itertools.count()


class NetnsUnavailableError(RuntimeError):
    """``ip netns add`` is not permitted here (not root, or no CAP_SYS_ADMIN)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclasses.dataclass(slots=True)
class Namespace:
    """One namespace: its name, the veth end inside it and that end's address."""

    name: str
    device: str
    address: str
    started: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` here; it is killed at teardown if still running."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.command(argv), **kwargs)
        self.started.append(proc)
        return proc

    def link(self, up: bool) -> None:
        """Bring this end of the veth up or down: the cable is plugged in or pulled out."""
        _ip("-n", self.name, "link", "set", "dev", self.device, "up" if up else "down")

    def pids(self) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in done.stdout.split()]

    def _teardown(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # What those started in turn (a lazy() handler and its supervisor): all ours, as the
        # namespace is; a process left inside would keep the namespace and its veth alive.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    server: Namespace
    client: Namespace


@contextlib.contextmanager
def pair() -> Iterator[Pair]:
    """A server and a client namespace, each with loopback up, joined by a veth pair.

    Raises :class:`NetnsUnavailableError` if namespaces cannot be made here.
    """
    tag = f"{os.getpid()}{next(_counter)}"[-9:]  # interface names hold 15 characters
    server = Namespace(f"uffd-srv-{tag}", f"ufs{tag}", SERVER_ADDRESS)
    client = Namespace(f"uffd-cli-{tag}", f"ufc{tag}", CLIENT_ADDRESS)
    made: list[Namespace] = []
    try:
        for ns in (server, client):
            try:
                _ip("netns", "add", ns.name)
            except RuntimeError as err:
                if not made and ("Permission" in str(err) or "not permitted" in str(err)):
                    raise NetnsUnavailableError(str(err)) from err
                raise
            made.append(ns)
        # Created with each end already inside its namespace: nothing lands in the host's.
        _ip("link", "add", server.device, "netns", server.name, "type", "veth",
            "peer", "name", client.device, "netns", client.name)  # fmt: skip
        for ns in (server, client):
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/{_PREFIX}", "dev", ns.device)
            _ip("-n", ns.name, "link", "set", "dev", "lo", "up")
            ns.link(up=True)
        yield Pair(server, client)
    finally:
        for ns in reversed(made):
            ns._teardown()


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port``, in its own namespace
    (read from /proc/PID/net/tcp, which shows the namespace the process is in)."""
    try:
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)

"""redis-server restored by CRIU, every key read back: the rows benchmarks/criu.py prints with
``--redis 64,256`` (``--no-redis`` to skip).

For each dataset size, one redis-server (``--port 0 --unixsocket PATH``: CRIU 4.1.1 cannot dump a
TCP socket on Linux 6.16 and later, criu.md) is filled with ``VALUE``-byte values, each byte
derived from its key's number and its place in the value, none zero, and dumped once. Every run
restores that dump with ``criu restore --lazy-pages -d`` served by one daemon, then a client of
our own (RESP over the unix socket, ``MGET`` of ``BATCH`` keys at a time) reads every key back
and compares each value with what was written. Columns, from the run with the best total:
  restore   criu restore until it returns (the restore's own faults served)
  read      every key read back and checked, after the restore returned
  total     from the restore's start until the last value was checked
  vs criu   total over criu lazy-pages' best total at the same size
  daemon CPU  the user and system time of the daemon and every process it started (the
            runtime's supervisor and handler), until all exited (background fill
            included): what serving costs, whatever else the machine is running
  redis RSS the restored redis-server's resident memory once the daemon has exited (every
            page it was going to fill is in), or 10 s after the last key was checked
The rows take turns run by run, on the same dump. Needs redis-server (``apt-get install -y
redis-server``); a row is left out, saying why, if it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REAPER = ROOT / "tests" / "criu" / "_reaper.py"

from tests.criu._restore import wait_for  # noqa: E402

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
#: Bytes per value: with redis's 3-byte string header and its NUL, jemalloc's 1 KiB class.
VALUE = 1000
#: Keys per MGET (a reply of about 250 KiB), and MGETs sent ahead of the reply being read.
BATCH = 256
WINDOW = 4
#: Each value is its key's number and then a run of this pattern from an offset that depends on
#: the key: every byte depends on the key and its place, and none is zero.
_PATTERN = bytes(range(1, 256)) * 6
_HEAD = b"$%d\r\n" % VALUE


def key(i: int) -> bytes:
    return b"key:%08d" % i


def value(i: int) -> bytes:
    head = b"%010d:" % i
    start = (i * 37) % 255
    return head + _PATTERN[start : start + VALUE - len(head)]


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _expected(first: int, count: int) -> bytes:
    """The reply to MGET of keys first..first+count-1 when every value is right."""
    return b"*%d\r\n" % count + b"".join(
        _HEAD + value(i) + b"\r\n" for i in range(first, first + count)
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """One MGET of keys ``first``.. and the reply it must get (made before any clock runs)."""

    first: int
    request: bytes
    reply: bytes


def batches(count: int) -> list[Batch]:
    """The MGETs that read keys 0..count-1 back, ``BATCH`` keys each."""
    return [
        Batch(first, _command(b"MGET", *(key(i) for i in range(first, min(first + BATCH, count)))),
              _expected(first, min(BATCH, count - first)))
        for first in range(0, count, BATCH)
    ]  # fmt: skip


def _wrong(batch: Batch, got: bytes) -> str:
    """Where ``got`` first differs from ``batch.reply``: the key and the byte in its value."""
    at = next((k for k, (a, b) in enumerate(zip(got, batch.reply, strict=True)) if a != b), 0)
    head = batch.reply.index(b"\r\n") + 2
    n, place = divmod(max(0, at - head), len(_HEAD) + VALUE + 2)
    where = (f"at byte {place - len(_HEAD)} of its value" if place >= len(_HEAD)
             else f"in its header (not a {VALUE}-byte value: missing?)")  # fmt: skip
    return (f"{key(batch.first + n)!r}: the reply differs {where} (read {got[at : at + 16]!r}, "
            f"wrote {batch.reply[at : at + 16]!r})")  # fmt: skip


class Client:
    """Just enough RESP over a unix socket for this benchmark: every reply read to its end."""

    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes:
        """The next ``size`` bytes of replies (a timeout if redis sends fewer)."""
        data = bytearray(size)
        view = memoryview(data)
        have = min(size, len(self.buffer))
        view[:have] = self.buffer[:have]
        del self.buffer[:have]
        while have < size:
            got = self.sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("redis closed the connection")
            have += got
        return bytes(data)

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buffer += data
        return self._exactly(end + 2)[:-2]

    def call(self, *parts: bytes) -> bytes:
        """One command whose reply is a status, an integer or a bulk string."""
        self.sock.sendall(_command(*parts))
        head = self.line()
        if head[:1] == b"-":
            raise RuntimeError(f"redis: {head.decode(errors='replace')}")
        if head[:1] == b"$":
            return self._exactly(int(head[1:]) + 2)[:-2]
        return head[1:]

    def fill(self, count: int) -> None:
        """Keys 0..count-1 with their values, ``BATCH`` at a time, each MSET checked."""
        for first in range(0, count, BATCH):
            pairs = [p for i in range(first, min(first + BATCH, count)) for p in (key(i), value(i))]
            if self.call(b"MSET", *pairs) != b"OK":
                raise RuntimeError(f"MSET of keys from {first} did not answer OK")

    def check(self, reads: list[Batch]) -> None:
        """Every batch's MGET sent (``WINDOW`` in flight) and its reply compared, byte for byte,
        with the values written; raises naming the first key whose value is wrong. A reply of
        another length (a key missing) ends in the socket's timeout."""
        for at, batch in enumerate(reads):
            if at == 0:
                for ahead in reads[:WINDOW]:
                    self.sock.sendall(ahead.request)
            elif at + WINDOW - 1 < len(reads):
                self.sock.sendall(reads[at + WINDOW - 1].request)
            got = self._exactly(len(batch.reply))
            if got != batch.reply:
                raise RuntimeError(_wrong(batch, got))


def _listening(path: Path) -> bool:
    """Whether a server listens at ``path`` (it binds before it listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def _sockets(pid: int) -> int:
    """How many sockets process ``pid`` has open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(os.readlink(fds / fd).startswith("socket:") for fd in os.listdir(fds))


@dataclass(frozen=True, slots=True)
class Dump:
    work: Path
    images: Path
    pid: int
    keys: int
    #: The MGETs that read every key back, with the replies they must get.
    reads: list[Batch] = field(repr=False)
    rss_mib: float


def dump(criu: str, work: Path, size_mib: int) -> Dump:
    """redis-server filled with ``size_mib`` MiB of values, dumped into ``work/img``."""
    shutil.rmtree(work, ignore_errors=True)
    images = work / "img"
    images.mkdir(parents=True)
    path = work / "redis.sock"
    server = subprocess.Popen(
        [REDIS, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(work), "--logfile", ""],
        cwd=work, start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for("redis-server listening", lambda: _listening(path), 30)
        idle = _sockets(server.pid)
        keys = (size_mib << 20) // VALUE
        client = Client(path)
        try:
            client.fill(keys)
            reads = batches(keys)
            client.check(reads)
            info = client.call(b"INFO", b"memory").decode()
        finally:
            client.close()
        rss = next(int(line.split(":")[1]) for line in info.split()
                   if line.startswith("used_memory_rss:"))  # fmt: skip
        # CRIU cannot dump a connection to a process outside the tree: wait for redis to drop it.
        wait_for("redis-server closing the client", lambda: _sockets(server.pid) == idle, 30)
        done = subprocess.run([criu, "dump", "-t", str(server.pid), "-D", str(images),
                               "-o", "dump.log"], capture_output=True, timeout=300,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"criu dump of redis-server failed; see {images}/dump.log")
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return Dump(work, images, server.pid, keys, reads, rss / (1 << 20))


@dataclass(frozen=True, slots=True)
class Row:
    restore: float
    read: float
    total: float
    #: The daemon's CPU time, user and system, from its start until it exits (after redis).
    cpu: float
    #: The restored redis-server's resident memory once the daemon exited, in MiB.
    rss: float


def restore(criu: str, dumped: Dump, daemon: list[str]) -> Row:
    """One lazy restore of ``dumped`` served by ``daemon`` (IMAGES stands for the images dir),
    timed until every key has been read back and checked; then redis is shut down."""
    images = dumped.images
    (images / "lazy-pages.socket").unlink(missing_ok=True)
    command = [part.replace("IMAGES", str(images)) for part in daemon]
    served = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SUBREAPER, *command],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert served.stdout is not None
    session = int(served.stdout.readline() or -1)
    reaper: subprocess.Popen[str] | None = None
    try:
        wait_for("the daemon's socket", (images / "lazy-pages.socket").exists, 60)
        started = time.monotonic()
        reaper = subprocess.Popen([sys.executable, str(REAPER), str(dumped.pid), "300", "--",
                                   criu, "restore", "-D", str(images), "--lazy-pages", "-d",
                                   "-o", "restore.log"], stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        assert reaper.stdout is not None
        line = reaper.stdout.readline().split()
        restored = time.monotonic() - started
        if line != ["restored", "0"]:
            raise RuntimeError(f"criu restore failed: {line}; see {images}/restore.log")
        client = Client(dumped.work / "redis.sock")
        try:
            client.check(dumped.reads)
            total = time.monotonic() - started
            if (size := client.call(b"DBSIZE")) != b"%d" % dumped.keys:
                raise RuntimeError(f"redis holds {size.decode()} keys, not {dumped.keys}")
            rss = _rss_once_served(served.pid, dumped.pid, 10.0)
            client.sock.sendall(_command(b"SHUTDOWN", b"NOSAVE"))
            with contextlib.suppress(ConnectionError):
                client.line()  # SHUTDOWN answers only if it failed
        finally:
            client.close()
        ending = reaper.stdout.readline().strip()
        if ending != "exit 0":
            raise RuntimeError(f"the restored redis-server ended {ending!r}")
        cpu = _reap(served, 120)
    finally:
        if reaper is not None and reaper.poll() is None:
            reaper.kill()  # it then leaves the restored redis to pid 1; kill that too
            reaper.wait()
            with contextlib.suppress(ProcessLookupError):
                os.kill(dumped.pid, 9)
        if served.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if session > 0:
                    os.killpg(session, 9)  # the daemon's session; the subreaper then ends
            try:
                served.wait(timeout=30)
            except subprocess.TimeoutExpired:
                served.kill()
                served.wait()
        served.stdout.close()
    return Row(restored, total - restored, total, cpu, rss)


def _rss_once_served(daemon: int, pid: int, timeout: float) -> float:
    """Task ``pid``'s resident memory in MiB once process ``daemon`` has exited (left
    unreaped), or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, daemon, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(0.01)
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmRSS:")) / 1024  # fmt: skip


#: Runs the daemon (argv) in a session of its own, as a child subreaper that reaps it and every
#: process it leaves behind (the runtime's supervisor and handler are not its children), so the
#: CPU time its parent gets from wait4() is the daemon's whole tree's. Prints the daemon's pid.
_SUBREAPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = os.fork()
if child == 0:
    os.setsid()
    os.execvp(sys.argv[1], sys.argv[1:])
print(child, flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def _reap(process: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``process`` to exit; its CPU time and that of every child it reaped."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not exit within {timeout} s of redis")
        time.sleep(0.005)


@contextlib.contextmanager
def _tmp(work: Path) -> Iterator[Path]:
    """``work``, removed after unless something failed (its logs say what)."""
    yield work
    shutil.rmtree(work, ignore_errors=True)


def run(criu: str, daemons: dict[str, list[str]], sizes: list[int], repeat: int,
        tmp: str) -> None:  # fmt: skip
    """Print the redis rows: at each size, each daemon ``repeat`` times, taking turns."""
    if not os.path.exists(REDIS):
        print(f"redis rows: not run: {REDIS} is missing (apt-get install -y redis-server)")
        return
    version = subprocess.run([REDIS, "--version"], capture_output=True, text=True).stdout
    print(f"redis-server restored by CRIU, every key read back ({version.split()[2]}, "
          f"{VALUE}-byte values), best total of {repeat}")  # fmt: skip
    print(f"{'daemon':<38} {'restore':>9} {'read':>9} {'total':>9}  vs criu  daemon CPU  redis RSS")
    with _tmp(Path(tmp) / "redis-work") as work:
        for size in sizes:
            dumped = dump(criu, work, size)
            print(f"{size} MiB of values: {dumped.keys} keys, redis RSS {dumped.rss_mib:.0f} MiB "
                  f"at dump, pages images {_pages_mib(dumped.images):.0f} MiB")  # fmt: skip
            runs: dict[str, list[Row]] = {name: [] for name in daemons}
            failed: dict[str, list[str]] = {name: [] for name in daemons}
            for _ in range(repeat):
                for name, command in daemons.items():
                    try:
                        runs[name].append(restore(criu, dumped, command))
                    except RuntimeError as err:  # said below the table, not hidden
                        log = dumped.images / "restore.log"
                        tail = log.read_text().splitlines()[-3:] if log.exists() else []
                        failed[name].append(f"{err} ({' | '.join(tail)})")
            bases = [r.total for r in next(iter(runs.values()))]
            base = min(bases) if bases else float("nan")
            for name, rows in runs.items():
                label = f"{name}, {size} MiB"
                if not rows:
                    print(f"{label:<38} every run failed", flush=True)
                    continue
                best = min(rows, key=lambda r: r.total)
                print(f"{label:<38} {best.restore:>8.3f}s {best.read:>8.3f}s "
                      f"{best.total:>8.3f}s  {best.total / base:6.2f}x  {best.cpu:>9.3f}s"
                      f"  {best.rss:>5.0f} MiB",
                      flush=True)  # fmt: skip
            for name, errors in failed.items():
                for error in errors:
                    print(f"  a run of {name} failed: {error}", flush=True)


def _pages_mib(images: Path) -> float:
    return sum(p.stat().st_size for p in images.glob("pages-*.img")) / (1 << 20)

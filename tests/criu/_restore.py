"""One dump of the target and one lazy restore of it, with deadlines on every wait."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent


def wait_for(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


@dataclass
class Dumped:
    """A dump of the target in ``images`` (the target ran in ``work``)."""

    criu: str
    work: Path
    images: Path
    pid: int


def dump(criu: str, target: str, work: Path, *extra: str) -> Dumped:
    """Start the target (under _reaper.py --tree, which reaps whatever of its tree the dump
    leaves, a zombie child included), wait for its memory to be ready, dump it (which ends
    it) and wait until its whole tree is reaped: the restore needs every pid free."""
    images = work / "img"
    images.mkdir()
    reaper = subprocess.Popen([sys.executable, str(HERE / "_reaper.py"), "--tree", "120", "--",
                               target, str(work), *extra], cwd=work, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    pid = -1
    try:
        assert reaper.stdout is not None
        pid = int(reaper.stdout.readline().split()[1])
        wait_for("the target's ready file", (work / "ready").exists, 20)
        done = subprocess.run([criu, "dump", "-t", str(pid), "-D", str(images),
                               "-o", "dump.log"], capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip
        assert done.returncode == 0, f"criu dump failed:\n{_tail(images / 'dump.log')}"
        reaper.wait(timeout=20)  # the dump killed the tree; the restore needs its pids free
    finally:
        if reaper.poll() is None:
            if pid > 0:  # the target's tree, in its own session: the reaper then ends
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            try:
                reaper.wait(timeout=20)
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait()
    return Dumped(criu, work, images, pid)


@dataclass
class Restored:
    """How a lazy restore went: the daemon's status, summary and log, the target's outcome."""

    daemon_status: int
    summary: str
    daemon_log: str
    restore_status: int
    #: "exit N" or "signal N" (from a subreaper), and the target's own report.
    ending: str
    result: str
    child_result: str


def daemon(dumped: Dumped, *options: str) -> tuple[subprocess.Popen[str], Path]:
    """``uffd lazy-pages IMAGES`` started, listening (or ended: a refused image)."""
    log = dumped.work / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "lazy-pages", *options, str(dumped.images)],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, start_new_session=True,
    )  # fmt: skip

    def up() -> bool:
        return "listening on" in log.read_text() or process.poll() is not None

    wait_for("uffd lazy-pages listening", up, 30)
    return process, log


def restore(
    dumped: Dumped, *options: str, kill_handler_after: float | None = None,
    after_go: Callable[[], None] | None = None,
) -> Restored:  # fmt: skip
    """Serve a lazy restore of ``dumped`` with ``uffd lazy-pages OPTIONS``; let the restored
    target check its memory; collect every outcome (with a deadline on each). ``after_go`` is
    called once the restored target was told to start checking (e.g. to kill a server)."""
    process, log = daemon(dumped, *options)
    try:
        assert process.poll() is None, f"uffd lazy-pages did not start:\n{log.read_text()}"
        reaper = subprocess.Popen(
            [sys.executable, str(HERE / "_reaper.py"), str(dumped.pid), "90", "--",
             dumped.criu, "restore", "-D", str(dumped.images), "--lazy-pages", "-d",
             "-o", "restore.log"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert reaper.stdout is not None
        first = reaper.stdout.readline().split()
        restore_status = int(first[1]) if len(first) == 2 and first[1].isdigit() else -1
        if restore_status == 0:
            (dumped.work / "go").touch()
            if kill_handler_after is not None:
                time.sleep(kill_handler_after)
                _kill_handler(log)
            if after_go is not None:
                after_go()
        ending = reaper.stdout.readline().strip()
        reaper.wait(timeout=100)
        out, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    result = (dumped.work / "result").read_text() if (dumped.work / "result").exists() else ""
    child = dumped.work / "result-child"
    return Restored(
        process.returncode, out.strip(), log.read_text(), restore_status, ending, result,
        child.read_text() if child.exists() else "",
    )  # fmt: skip


def restore_log(dumped: Dumped) -> str:
    return _tail(dumped.images / "restore.log", 25)


def _kill_handler(log: Path) -> int:
    """SIGKILL the handler the daemon reported for the first task."""
    for line in log.read_text().splitlines():
        if " handler " in line:
            pid = int(line.split(" handler ")[1].split(",")[0])
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError(f"the daemon reported no handler:\n{log.read_text()}")

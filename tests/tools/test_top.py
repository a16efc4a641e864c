"""uffd top: a real program with lazy arrays, watched from outside; what it shows equals what the
program did, and the program runs as it would unwatched."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from userfaultfd.cli._top import render
from userfaultfd.runtime import Stats
from userfaultfd.tools import ServerView, Top, TopFrame
from userfaultfd.tools._top import rate

PROGRAM = Path(__file__).with_name("_top_program.py")
PAGE = 4096
PAGES = 256
ROOT = Path(__file__).resolve().parents[2]


class Program:
    """tests/tools/_top_program.py running, spoken to a JSON line at a time, with deadlines."""

    def __init__(self, source: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, str(PROGRAM), str(source)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.pid = self.process.pid
        self.handlers: list[int] = self.answer(60)["handlers"]

    def answer(self, timeout: float) -> Any:
        assert self.process.stdout is not None
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            raise AssertionError(f"the program said nothing within {timeout} s")
        line = self.process.stdout.readline()
        assert line, f"the program ended: {self.process.wait(10)}, {self.stderr()}"
        return json.loads(line)

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read() if self.process.poll() is not None else ""

    def finish(self) -> int:
        """Tell it to check its pages again and exit; its exit status."""
        self.tell("exit")
        return self.process.wait(30)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "words.u64"
    np.arange(1, PAGES * PAGE // 8 + 1, dtype="<u8").tofile(path)
    return path


@pytest.fixture
def program(source: Path) -> Iterator[Program]:
    running = Program(source)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait(10)


def top(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", "top", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def rows(out: str) -> dict[int, dict[str, str]]:
    """The rows of a frame ``uffd top --once`` printed, by handler pid, cells by column name."""
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("handler"))
    names = header.replace("fill MB/s", "fill_MB/s").replace("p50/p90/p99 us", "latency").split()
    found = {}
    for line in lines[lines.index(header) + 1 :]:
        cells = line.split()
        if len(cells) == len(names) and cells[0].isdigit():
            found[int(cells[0])] = dict(zip(names, cells, strict=True))
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.timeout(120)
def test_once_shows_each_server_as_the_program_counted(program: Program) -> None:
    done = top(str(program.pid), "--once", "--interval", "0.3")
    assert done.returncode == 0, done.stderr
    shown = rows(done.stdout)
    a, b = program.handlers
    # The directly mapped array has no handler, so two servers, not three.
    assert sorted(shown) == sorted(program.handlers), f"servers shown: {done.stdout}"
    assert "2 servers" in done.stdout, done.stdout
    for handler, touched in ((a, 7), (b, 13)):
        row = shown[handler]
        names = ("faults", "filled", "poisoned", "errors", "restarts", "zero", "prefetched",
                 "faults/s")  # fmt: skip
        measured = {k: number(row[k]) for k in names}
        assert measured == {"faults": touched, "filled": touched, "poisoned": 0, "errors": 0,
                            "restarts": 0, "zero": 0, "prefetched": 0, "faults/s": 0}, (
            f"handler {handler} touched {touched} pages, one fault each: {row}"
        )  # fmt: skip
        assert row["state"] == "serving", row
    # The program's own counters, asked after: the same numbers (top changed none of them).
    program.tell("stats")
    assert program.answer(30)["stats"] == [[7, 7, 0, 0], [13, 13, 0, 0]]
    assert program.finish() == 0, f"the program's own check failed: {program.stderr()}"


@pytest.mark.timeout(120)
def test_the_library_frame_counts_pages_and_resident_memory(program: Program) -> None:
    with Top(program.pid) as watcher:
        first = watcher.frame()
        second = watcher.frame()
    assert first.seconds is None and second.seconds is not None and second.seconds >= 0
    assert all(s.faults_per_s is None for s in first.servers), "a rate before a second look"
    by_handler = {s.handler_pid: s for s in second.servers}
    assert sorted(by_handler) == sorted(program.handlers)
    a, b = program.handlers
    assert (by_handler[a].stats.pages, by_handler[b].stats.pages) == (7, 13)
    assert (by_handler[a].stats.bytes, by_handler[b].stats.bytes) == (7 * PAGE, 13 * PAGE)
    assert by_handler[a].faults_per_s == 0.0 and by_handler[b].fill_bytes_per_s == 0.0
    # Two arrays of the whole file registered; the pages touched in them, and no other, resident.
    assert second.registered_bytes == 2 * PAGES * PAGE, second
    assert second.resident_bytes == 20 * PAGE, second
    assert second.command == "python" or second.command.startswith("python"), second.command
    assert program.finish() == 0, program.stderr()


@pytest.mark.timeout(120)
def test_the_rate_is_the_programs(program: Program) -> None:
    program.tell("rate")
    assert program.answer(30) == {"rating": True}
    time.sleep(0.3)  # well inside the 3 s the program touches for
    done = top(str(program.pid), "--once", "--interval", "1.5")
    assert done.returncode == 0, done.stderr
    shown = rows(done.stdout)
    a, b = program.handlers
    assert number(shown[a]["faults/s"]) == 0, f"A touched nothing: {shown[a]}"
    # 50 pages a second on a fixed schedule: a late start or a slow machine shaves a little.
    assert 30 <= number(shown[b]["faults/s"]) <= 60, f"B touched 50 pages/s: {shown[b]}"
    fill = number(shown[b]["fill_MB/s"])
    assert 30 * PAGE / 1e6 - 0.05 <= fill <= 60 * PAGE / 1e6 + 0.05, f"one page a fault: {fill}"
    assert program.answer(30) == {"rated": 150}
    program.tell("stats")
    assert program.answer(30)["stats"] == [[7, 7, 0, 0], [163, 163, 0, 0]]
    assert program.finish() == 0, program.stderr()


@pytest.mark.timeout(120)
def test_live_view_ends_when_the_program_exits(program: Program) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "top", str(program.pid), "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        assert watcher.poll() is None, f"top ended on its own: {watcher.communicate()}"
        assert program.finish() == 0, program.stderr()
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
    assert watcher.returncode == 0, err
    assert f"uffd top: process {program.pid} exited" in out, out


@pytest.mark.timeout(120)
def test_ctrl_c_ends_the_live_view_cleanly(program: Program) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "top", str(program.pid), "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
    assert watcher.returncode == 0, f"Ctrl-C is how top ends, not a failure: {err}"
    assert "Traceback" not in err, err
    # The program goes on unharmed: its counters and its data are as they were.
    program.tell("stats")
    assert program.answer(30)["stats"] == [[7, 7, 0, 0], [13, 13, 0, 0]]
    assert program.finish() == 0, program.stderr()


@pytest.mark.timeout(60)
def test_a_program_without_servers_and_no_program() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        done = top(str(sleeper.pid), "--once", "--interval", "0.1")
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert done.returncode == 0, done.stderr
    assert f"no lazy memory served by a handler in process {sleeper.pid}" in done.stdout
    gone = top(str(sleeper.pid), "--once")
    assert (gone.returncode, gone.stderr) == (1, f"uffd: no process {sleeper.pid}\n")


def stats(**counts: int) -> Stats:
    """A Stats record: ``counts``, every other counter 0, and a last error."""
    fields: dict[str, Any] = {f: 0 for f in Stats.__dataclass_fields__}
    fields |= dict(latency_p50_us=5.0, latency_p90_us=9.0, latency_p99_us=40.0, path="python",
                   last_error="store: EIO at offset 8192")  # fmt: skip
    return Stats(**(fields | counts))


def test_rate_and_render_without_a_program() -> None:
    assert rate(10, 60, 2.0) == 25.0
    assert rate(None, 60, 2.0) is None and rate(10, 60, None) is None and rate(1, 2, 0.0) is None
    view = ServerView(handler_pid=4242, state="serving", stats=stats(faults=3, pages=5, poisoned=2),
                      faults_per_s=1.5, fill_bytes_per_s=2_500_000.0, key=("00:01", 7))  # fmt: skip
    frame = TopFrame(pid=99, command="prog", servers=(view,), registered_bytes=8 << 20,
                     resident_bytes=1 << 20, seconds=1.0)  # fmt: skip
    from rich.console import Console

    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(frame, 1.0))
    text = console.export_text()
    console.file.close()
    row = rows(text)[4242]
    assert (row["faults"], row["faults/s"], row["filled"], row["fill_MB/s"], row["poisoned"],
            row["latency"]) == ("3", "1.5", "5", "2.5", "2", "5/9/40"), text  # fmt: skip
    assert "8.0 MiB registered, 1.0 MiB resident" in text, text
    assert "handler 4242: store: EIO at offset 8192" in text, "the last error is not shown"

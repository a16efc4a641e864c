"""Live snapshots: the image equals memory at the protect instant, whatever writers do after."""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target, page_difference, pattern
from userfaultfd import memory
from userfaultfd.tools import snapshot

Log = list[tuple[int, bytes]]


def writers(mapping: memory.Mapping, unit: int, count: int, stop: threading.Event) -> tuple[
    list[threading.Thread], list[Log]
]:  # fmt: skip
    """``count`` native writer threads stamping random pages until ``stop``; each logs what it
    wrote, in order (page index, 16 bytes)."""
    logs: list[Log] = [[] for _ in range(count)]

    def run(number: int) -> None:
        rng = random.Random(number)
        pages = mapping.length // unit
        while not stop.is_set():
            index = rng.randrange(pages)
            stamp = f"w{number}:{len(logs[number]):013d}".encode()[:16].ljust(16, b".")
            ctypes.memmove(mapping.address + index * unit, stamp, 16)  # no GIL held: native
            logs[number].append((index, stamp))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    return threads, logs


def snapshot_under_writes(
    make: Callable[[], memory.Mapping], unit: int, image: str, *, touch: bool = True
) -> Callable[[Channel], None]:
    def body(channel: Channel) -> None:
        mapping = make()
        if touch:
            for i in range(mapping.length // unit):
                mapping.view[i * unit : i * unit + 32] = hashlib.sha256(b"%d" % i).digest()
        before = bytes(mapping.view)
        stop = threading.Event()
        threads, logs = writers(mapping, unit, 2, stop)
        snap = snapshot(mapping, image)
        for t in threads:
            t.start()
        stats = snap.wait(timeout=60)
        time.sleep(0.05)  # writes go on after the snapshot, unhindered
        stop.set()
        for t in threads:
            t.join(10)
        with open(image, "rb") as f:
            exact = page_difference(f.read(), before, unit)
        # Memory holds every write: per page, the last stamp logged (threads interleave, so
        # check each page's final 16 bytes is the last stamp some thread wrote there).
        last: dict[int, set[bytes]] = {}
        for log in logs:
            for index, stamp in log:
                last[index] = {stamp} if index not in last else last[index] | {stamp}
        lost = [
            f"page {i} held {bytes(mapping.view[i * unit : i * unit + 16])!r}, not one of {stamps}"
            for i, stamps in sorted(last.items())
            if bytes(mapping.view[i * unit : i * unit + 16]) not in stamps
        ]
        landed = lost[0] if lost else ""
        channel.send((exact, landed, sum(map(len, logs)), stats))

    return body


def run(body: Callable[[Channel], None], timeout: float = 90) -> Any:
    with Target(body, timeout=timeout) as target:
        result, _ = target.recv(timeout=timeout)
        assert target.exit_code() == 0
        return result


@pytest.mark.parametrize("kind", ["anonymous", "shmem"])
def test_image_is_memory_at_the_protect_instant(kind: str, tmp_path: Path) -> None:
    make = {
        "anonymous": lambda: memory.anonymous(2048 * PAGE),
        "shmem": lambda: memory.memfd(2048 * PAGE),
    }[kind]
    exact, landed, writes, stats = run(snapshot_under_writes(make, PAGE, str(tmp_path / "img")))
    assert not exact, f"the image differs from memory at the protect instant: {exact}"
    assert not landed, f"a write was lost: {landed}"
    assert writes > 0
    assert stats.saved == stats.pages == 2048
    assert stats.early <= stats.faults


def test_hugetlbfs_image_is_exact(tmp_path: Path, hugepages: int, huge_page: int) -> None:
    make = lambda: memory.memfd(4 * huge_page, hugetlb=True)  # noqa: E731
    exact, landed, _, stats = run(snapshot_under_writes(make, huge_page, str(tmp_path / "img")))
    assert (exact, landed, stats.pages) == ("", "", 4)


def test_pages_never_touched_are_caught_too(tmp_path: Path) -> None:
    """WP_UNPOPULATED: a first write to a never-touched page still waits for the handler."""
    exact, landed, _, stats = run(snapshot_under_writes(
        lambda: memory.anonymous(1024 * PAGE), PAGE, str(tmp_path / "img"), touch=False
    ))  # fmt: skip
    assert (exact, landed) == ("", "")  # the image is all zeros, as memory was
    assert stats.saved == 1024


def test_image_uploaded_to_an_fsspec_url() -> None:
    import fsspec

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(64 * PAGE)
        mapping.view[:] = random.Random(1).randbytes(mapping.length)
        before = bytes(mapping.view)
        snapshot(mapping, "memory://snapshots/one.img").wait(timeout=30)
        mapping.view[:4] = b"late"
        with fsspec.open("memory://snapshots/one.img", "rb") as f:
            channel.send(page_difference(f.read(), before))

    assert run(body) == ""


def test_a_dead_handler_fails_the_snapshot_without_hanging_writers(tmp_path: Path) -> None:
    def body(channel: Channel) -> None:
        mapping = memory.anonymous(4096 * PAGE)
        snap = snapshot(mapping, str(tmp_path / "img"), chunk_bytes=PAGE)
        os.kill(snap.pid, signal.SIGKILL)
        ctypes.memmove(mapping.address + 4095 * PAGE, b"still writable", 14)
        try:
            snap.wait(timeout=10)
            channel.send("no error")
        except RuntimeError as err:
            channel.send(str(err))

    message = run(body)
    assert message == "the snapshot handler failed: it ended without a report (killed by a signal)"
    assert os.listdir(tmp_path) == [], "a failed snapshot left files behind"


def patterned(pages: int) -> memory.Mapping:
    """Anonymous memory whose page i holds pattern(i): position-dependent, never zero."""
    mapping = memory.anonymous(pages * PAGE)
    for i in range(pages):
        mapping.view[i * PAGE : (i + 1) * PAGE] = pattern(i)
    return mapping


def test_the_programs_own_os_wait_does_not_take_the_handler(tmp_path: Path) -> None:
    """The handler was the program's child: an ``os.wait()`` in the program reaped it, and
    ``Snapshot.wait()`` then failed with ChildProcessError. A daemon is nobody's child."""
    image = tmp_path / "img"

    def body(channel: Channel) -> None:
        mapping = patterned(256)
        before = bytes(mapping.view)
        snap = snapshot(mapping, str(image))
        try:
            reaped = f"os.wait() reaped {os.wait()}"
        except ChildProcessError:  # no child: the handler is not one
            reaped = ""
        snap.wait(timeout=30)
        channel.send((reaped, page_difference(image.read_bytes(), before)))

    assert run(body) == ("", "")


def test_a_forked_child_leaves_the_image_to_the_program(tmp_path: Path) -> None:
    """A child forked during the snapshot writes its own copy and waits too: the image is still
    memory at the protect instant, and only the program puts it in place."""
    image = tmp_path / "img"

    def body(channel: Channel) -> None:
        mapping = patterned(256)
        before = bytes(mapping.view)
        snap = snapshot(mapping, str(image))
        child = os.fork()
        if child == 0:
            code = 1
            try:
                ctypes.memmove(mapping.address + 7 * PAGE, b"the child's copy", 16)
                code = 0 if snap.wait(timeout=30).saved == 256 else 3
            finally:
                os._exit(code)
        ctypes.memmove(mapping.address + 9 * PAGE, b"the program's own", 17)
        stats = snap.wait(timeout=30)
        _, status = os.waitpid(child, 0)
        exact = page_difference(image.read_bytes(), before)
        channel.send((exact, os.waitstatus_to_exitcode(status), stats.saved, os.listdir(tmp_path)))

    assert run(body) == ("", 0, 256, ["img"])


def test_bad_regions_and_destinations_are_refused(tmp_path: Path) -> None:
    with memory.anonymous(4 * PAGE) as mapping:
        with pytest.raises(ValueError, match="aligned range"):
            snapshot((mapping.address + 1, PAGE), str(tmp_path / "img"))
        with pytest.raises(FileNotFoundError, match="No such file or directory"):
            snapshot(mapping, str(tmp_path / "no" / "such" / "dir" / "img"))


def test_uffd_snapshot_demo_reports_an_exact_image(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "snapshot", str(tmp_path / "demo.img"), "--size",
         "16M", "--writers", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"uffd snapshot: 4096 pages in .*; image equals memory at the protect instant\n",
        done.stdout,
    ), done.stdout
    assert os.listdir(tmp_path) == ["demo.img"]  # no demo.img.partial left


def uffd_snapshot(dest: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``uffd snapshot DEST`` with its temp files in ``tmp``; it must end within 20 s."""
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", "snapshot", dest, "--size", "16M"],
        capture_output=True, text=True, timeout=20, env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dest", "reason"),
    [
        ("http://127.0.0.1:9/image", "its filesystem cannot write files"),
        ("{tmp}/no/such/dir/image", "No such file or directory"),
        ("{tmp}", "it is a directory"),
    ],
)
def test_an_unwritable_destination_is_one_line_at_once(tmp_path: Path, dest: str,
                                                       reason: str) -> None:  # fmt: skip
    """An http:// destination printed ``uffd: NotImplementedError`` after the whole snapshot,
    then spun forever (the writers never stopped) and left the image in a temp dir."""
    dest = dest.format(tmp=tmp_path)
    done = uffd_snapshot(dest, tmp_path / "tmp")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    assert done.stderr.splitlines() == [f"uffd: cannot write the snapshot to {dest}: {reason}"]
    assert done.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["tmp"] and os.listdir(tmp_path / "tmp") == []


def test_a_read_only_filesystem_is_one_line(tmp_path: Path) -> None:
    """A destination on a read-only mount: the error names DEST and the reason, nothing else."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-o", "bind,ro", str(folder), str(folder)],
                      capture_output=True, timeout=30).returncode:  # fmt: skip
        pytest.skip("cannot bind-mount read-only here (needs root)")
    try:
        done = uffd_snapshot(str(folder / "image"), tmp_path / "tmp")
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    assert done.stderr.splitlines() == [
        f"uffd: cannot write the snapshot to {folder / 'image'}: Read-only file system"
    ]
    assert os.listdir(folder) == [] and os.listdir(tmp_path / "tmp") == []


def test_a_failure_mid_way_fails_the_snapshot_and_leaves_nothing(tmp_path: Path) -> None:
    """A handler thread that raises ends the snapshot with its reason; no image, no .partial."""
    image = tmp_path / "img"

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(512 * PAGE)
        mapping.view[:] = b"\x5a" * mapping.length
        calls = [0]
        real = os.pwrite

        def failing(fd: int, data: Any, offset: int) -> int:  # runs in the forked handler
            calls[0] += 1
            if calls[0] > 3:
                raise OSError(28, "No space left on device")
            return real(fd, data, offset)

        os.pwrite = failing  # this process is the test's own fork: nothing else sees it
        stop = threading.Event()
        threads, _ = writers(mapping, PAGE, 2, stop)
        snap = snapshot(mapping, str(image), chunk_bytes=4 * PAGE)
        for t in threads:
            t.start()
        try:
            snap.wait(timeout=20)
            channel.send("no error")
        except RuntimeError as err:
            channel.send(str(err))
        finally:
            stop.set()
            for t in threads:
                t.join(10)

    message = run(body, timeout=60)
    assert message == "the snapshot handler failed: OSError: [Errno 28] No space left on device"
    assert os.listdir(tmp_path) == []


def test_a_url_upload_that_fails_leaves_nothing() -> None:
    import fsspec

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(16 * PAGE)
        mapping.view[:] = b"\x33" * mapping.length
        snap = snapshot(mapping, "memory://failing/one.img")
        local = snap._destination.local

        def broken_mv(*args: object, **kwargs: object) -> None:
            raise OSError(5, "the upload broke")

        fs = fsspec.filesystem("memory")
        fs.mv = broken_mv
        try:
            snap.wait(timeout=20)
            channel.send("no error")
        except OSError as err:
            left = fs.exists("/failing/one.img"), fs.exists("/failing/one.img.partial")
            channel.send((str(err), *left, os.path.exists(local)))

    message, final, partial, local = run(body)
    assert message == "cannot write the snapshot to memory://failing/one.img: the upload broke"
    assert (final, partial, local) == (False, False, False)

"""Events are durable the moment they are read: a handler killed while a slow store read keeps it
busy (its watcher has read the program's madvise or mremap, stashed for the loop) is restarted
from a map that has them. Before, the restarted handler served the old map: dropped pages read
the store's bytes instead of zeros, moved pages were served from the offset of their new address.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.runtime.test_serve import _libc, in_target
from userfaultfd import memory
from userfaultfd._libc import madvise
from userfaultfd.runtime import Single, serve
from userfaultfd.stores import BytesStore

PAGE = mmap.PAGESIZE
PAGES = 64
SLOW_PAGE = 48  # the page whose read keeps the handler busy


def _data() -> bytes:
    """Position-dependent bytes with no zero: byte k of page i is 1 + (i * 31 + k) % 253."""
    return bytes(1 + (i * 31 + k) % 253 for i in range(PAGES) for k in range(PAGE))


class _SlowPage(BytesStore):
    """A read that covers SLOW_PAGE takes a second."""

    def read_range(self, offset: int, view: memoryview) -> None:
        if offset <= SLOW_PAGE * PAGE < offset + len(view):
            time.sleep(1.0)
        super().read_range(offset, view)


def _kill_during_a_slow_read(change: str) -> list[str]:
    """In the program: fill pages 0-31, fault on SLOW_PAGE from a thread, ``change`` the map
    while the handler reads it, SIGKILL the handler, and check every page afterwards."""
    data = _data()
    mapping = memory.anonymous(PAGES * PAGE)
    wrong: list[str] = []
    with serve([mapping], _SlowPage(data), policy=Single()) as server:
        head = bytes(mapping.view[: 32 * PAGE])
        if head != data[: 32 * PAGE]:
            return ["pages 0-31 were wrong before anything happened"]
        slow = threading.Thread(  # ctypes lets go of the GIL while its thread waits in the fault
            target=ctypes.string_at, args=(mapping.address + SLOW_PAGE * PAGE, PAGE)
        )
        slow.start()
        time.sleep(0.2)  # the handler is in the slow read; its watcher reads the events now
        victim = server.handler_pid
        moved_to = 0
        if change == "remove":
            madvise(mapping.address, 8 * PAGE, mmap.MADV_DONTNEED)  # returns once it is read
        else:
            target = mmap.mmap(-1, 16 * PAGE)
            moved_to = ctypes.addressof(ctypes.c_char.from_buffer(target))
            # Pages 32-47, never filled: each is faulted at its new address after the restart.
            got = _libc.mremap(mapping.address + 32 * PAGE, 16 * PAGE, 16 * PAGE, 3, moved_to)
            if got != moved_to:
                return [f"mremap failed: errno {ctypes.get_errno()}"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while server.handler_pid == victim and time.monotonic() < deadline:
            time.sleep(0.01)
        if server.handler_pid == victim:
            return ["the supervisor did not restart the killed handler within 20 s"]
        slow.join(timeout=20)
        if change == "remove":
            dropped = bytes(mapping.view[: 8 * PAGE])
            if dropped != bytes(8 * PAGE):
                first = next(i for i, b in enumerate(dropped) if b) // PAGE
                wrong.append(f"dropped page {first} held {dropped[first * PAGE]} after the "
                             "restart, not zeros")  # fmt: skip
            kept = bytes(mapping.view[8 * PAGE :])
            if kept != data[8 * PAGE :]:
                bad = next(i for i in range(len(kept)) if kept[i] != data[8 * PAGE + i])
                wrong.append(f"page {8 + bad // PAGE} held {kept[bad]}, not {data[8 * PAGE + bad]}")
        else:
            moved = ctypes.string_at(moved_to, 16 * PAGE)
            want = data[32 * PAGE : 48 * PAGE]
            if moved != want:
                bad = next(i for i in range(len(moved)) if moved[i] != want[i])
                wrong.append(f"moved page {32 + bad // PAGE} held {moved[bad]}, not {want[bad]}")
            rest = bytes(mapping.view[48 * PAGE :])
            if rest != data[48 * PAGE :]:
                bad = next(i for i in range(len(rest)) if rest[i] != data[48 * PAGE + i])
                wrong.append(f"page {48 + bad // PAGE} held {rest[bad]}")
        if server.stats().restarts < 1:
            wrong.append("no restart was counted")
    return wrong


@pytest.mark.timeout(90)
@pytest.mark.parametrize("change", ["remove", "remap"])
def test_a_change_read_during_a_slow_read_survives_the_handler_killed(change: str) -> None:
    wrong = in_target(lambda: _kill_during_a_slow_read(change), timeout=60)
    assert not wrong, wrong


def _killed_between_read_and_report(change: str, flag: str) -> list[str]:
    """The handler dies right after it reads ``change`` (the test hook), before any report."""
    data = _data()
    mapping = memory.anonymous(PAGES * PAGE)
    os.environ["UFFD_TEST_KILL_BEFORE_REPORT"] = flag
    wrong: list[str] = []
    with serve([mapping], BytesStore(data), policy=Single()) as server:
        if bytes(mapping.view[: 32 * PAGE]) != data[: 32 * PAGE]:
            return ["pages 0-31 were wrong before anything happened"]
        victim = server.handler_pid
        open(flag, "w").close()  # armed: the next change read kills the handler
        if change == "remove":
            madvise(mapping.address, 8 * PAGE, mmap.MADV_DONTNEED)
            got, want = bytes(mapping.view[: 8 * PAGE]), bytes(8 * PAGE)
        elif change == "remap":
            target = mmap.mmap(-1, 16 * PAGE)
            moved_to = ctypes.addressof(ctypes.c_char.from_buffer(target))
            if _libc.mremap(mapping.address + 32 * PAGE, 16 * PAGE, 16 * PAGE, 3, moved_to) != (
                moved_to
            ):  # fmt: skip
                return [f"mremap failed: errno {ctypes.get_errno()}"]
            got, want = ctypes.string_at(moved_to, 16 * PAGE), data[32 * PAGE : 48 * PAGE]
        else:  # unmap pages 8-15; the restarted handler must not think them still registered
            if _libc.munmap(mapping.address + 8 * PAGE, 8 * PAGE) != 0:
                return [f"munmap failed: errno {ctypes.get_errno()}"]
            got, want = bytes(mapping.view[16 * PAGE : 32 * PAGE]), data[16 * PAGE : 32 * PAGE]
        # munmap() returns once the UNMAP event is read; the hook removes the flag just after.
        deadline = time.monotonic() + 5
        while os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.001)
        if os.path.exists(flag):
            wrong.append("the hook did not fire: the handler read no change")
        if got != want:
            bad = next(i for i in range(len(got)) if got[i] != want[i])
            wrong.append(f"{change}: byte {bad} (page {bad // PAGE}) held {got[bad]}, not "
                         f"{want[bad]}")  # fmt: skip
        rest = bytes(mapping.view[48 * PAGE :])
        if rest != data[48 * PAGE :]:
            wrong.append("pages 48-63 were wrong after the restart")
        if server.handler_pid == victim or server.stats().restarts < 1:
            wrong.append("the handler was not killed and restarted")
        if change == "unmap":
            mapping.close = lambda: None  # type: ignore[method-assign]  # (a hole is in it)
    return wrong


@pytest.mark.timeout(90)
@pytest.mark.parametrize("change", ["remove", "remap", "unmap"])
def test_a_handler_killed_between_reading_a_change_and_reporting_it(
    change: str, tmp_path: Path
) -> None:
    flag = str(tmp_path / "kill-before-report")
    wrong = in_target(lambda: _killed_between_read_and_report(change, flag), timeout=60)
    assert not wrong, wrong

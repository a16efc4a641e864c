"""Both daemons killed at once: the program's watchdog settles its pages (see runtime/_export).

Before, nothing held the program's uffd once the supervisor and the handler were both gone: the
kernel unregistered the ranges and every page not filled yet read zeros (1,047,552 of 1,048,576
elements in the adversarial trial). Now pages not filled read SIGBUS (here: EIO through
/proc/self/mem, which reads them without dying), pages the program dropped read zeros, and
filled pages keep their bytes, wherever the program moved them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time

import pytest

from tests.runtime.test_serve import _libc, in_target
from userfaultfd import memory
from userfaultfd._libc import madvise
from userfaultfd._native import native_available
from userfaultfd.runtime import Single, serve
from userfaultfd.stores import BytesStore

PAGE = mmap.PAGESIZE
PAGES = 64


def _data() -> bytes:
    """Position-dependent bytes with no zero: byte k of page i is 1 + (i * 29 + k) % 251."""
    return bytes(1 + (i * 29 + k) % 251 for i in range(PAGES) for k in range(PAGE))


def _registered(address: int) -> bool:
    """Whether the range at ``address`` is still registered with a userfaultfd (smaps um)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{address:x}-"):
            flags = next(f for f in lines[i:] if f.startswith("VmFlags:"))
            return " um" in flags
    return False


def _read(mem: int, address: int) -> bytes | str:
    """One page through /proc/self/mem: its bytes, or the error (EIO for a poisoned page)."""
    try:
        return os.pread(mem, PAGE, address)
    except OSError as err:
        return os.strerror(err.errno or 0)


def _kill_both() -> list[str]:
    data = _data()
    mapping = memory.anonymous(PAGES * PAGE)
    server = serve([mapping], BytesStore(data), policy=Single())
    if bytes(mapping.view[: 16 * PAGE]) != data[: 16 * PAGE]:
        return ["pages 0-15 were wrong before the kill"]
    madvise(mapping.address + 4 * PAGE, 4 * PAGE, mmap.MADV_DONTNEED)  # filled, then dropped
    madvise(mapping.address + 20 * PAGE, 4 * PAGE, mmap.MADV_DONTNEED)  # dropped, never filled
    target = mmap.mmap(-1, 8 * PAGE)
    moved_to = ctypes.addressof(ctypes.c_char.from_buffer(target))
    if _libc.mremap(mapping.address + 40 * PAGE, 8 * PAGE, 8 * PAGE, 3, moved_to) != moved_to:
        return [f"mremap failed: errno {ctypes.get_errno()}"]
    time.sleep(0.3)  # the handler has reported the changes; the supervisor has published them
    for pid in (server.pid, server.handler_pid):
        os.kill(pid, signal.SIGKILL)
    # The watchdog closes the program's uffd once it has settled every page: the kernel then
    # lets the ranges go (smaps no longer flags them). Until then a read of a page not there
    # would wait in the fault.
    deadline = time.monotonic() + 20
    while _registered(mapping.address) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _registered(mapping.address):
        return ["the watchdog did not settle the pages within 20 s"]
    want: dict[int, bytes | str] = {}
    for page in range(PAGES):
        if page < 16 and not 4 <= page < 8:
            want[page] = data[page * PAGE : (page + 1) * PAGE]
        elif 4 <= page < 8 or 20 <= page < 24:
            want[page] = bytes(PAGE)
        else:
            want[page] = os.strerror(5)  # EIO: poisoned
    wrong = []
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        for page in range(PAGES):
            address = moved_to + (page - 40) * PAGE if 40 <= page < 48 else (
                mapping.address + page * PAGE
            )  # fmt: skip
            got, expected = _read(mem, address), want[page]
            if got != expected:
                shown = got if isinstance(got, str) else f"bytes starting {got[:4].hex()}"
                wanted = expected if isinstance(expected, str) else "its bytes or zeros"
                wrong.append(f"page {page}: {shown}, not {wanted}")
    finally:
        os.close(mem)
    return wrong


@pytest.mark.timeout(60)
def test_both_daemons_killed_leave_sigbus_or_zeros_where_they_belong_never_zeros_for_data() -> None:
    if not native_available():
        pytest.skip("the watchdog is a native thread: the extension is not built or UFFD_NATIVE=0")
    wrong = in_target(_kill_both, timeout=50)
    assert not wrong, wrong[:5]


def _kill_the_first_of_two() -> list[str]:
    """Two servers; both daemons of the first killed: its pages settle although the second
    server (started after it, so forked from a program holding the first's watchdog uffd)
    still runs."""
    data = _data()
    first, second = memory.anonymous(PAGES * PAGE), memory.anonymous(PAGES * PAGE)
    server = serve([first], BytesStore(data), policy=Single())
    later = serve([second], BytesStore(data), policy=Single())
    if bytes(first.view[:PAGE]) != data[:PAGE] or bytes(second.view[:PAGE]) != data[:PAGE]:
        return ["page 0 was wrong before the kill"]
    for pid in (server.pid, server.handler_pid):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _registered(first.address) and time.monotonic() < deadline:
        time.sleep(0.01)
    wrong = []
    if _registered(first.address):
        wrong.append(
            "the first range is still registered 20 s after its daemons died (a later server "
            "holds a copy of its uffd): a fault there would hang"
        )
    else:
        mem = os.open("/proc/self/mem", os.O_RDONLY)
        try:
            got = _read(mem, first.address + 9 * PAGE)  # never filled: poisoned
        finally:
            os.close(mem)
        if got != os.strerror(5):
            wrong.append(f"page 9 of the first range read {got!r:.40}, not EIO")
    if bytes(second.view[9 * PAGE : 10 * PAGE]) != data[9 * PAGE : 10 * PAGE]:
        wrong.append("the second server no longer serves its range")
    later.stop()
    return wrong


@pytest.mark.timeout(60)
def test_a_later_server_does_not_keep_an_earlier_range_registered() -> None:
    if not native_available():
        pytest.skip("the watchdog is a native thread: the extension is not built or UFFD_NATIVE=0")
    wrong = in_target(_kill_the_first_of_two, timeout=50)
    assert not wrong, wrong[:5]

"""Working sets that never block a fault, and why a page was poisoned reaching the program.

A prefetch file of any length is asked for a slice at a time behind the faults. Before, the
handler parsed and submitted the whole file (about 65 us a record) before it answered any fault:
2,000,000 records held the first fault for minutes.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_serve import in_target
from userfaultfd import memory
from userfaultfd.runtime import Single, serve
from userfaultfd.stores import BytesStore, StoreError

PAGE = mmap.PAGESIZE
PAGES = 16384  # 64 MiB
WORKING = 8192  # the working set: the first half
RECORDS = 2_000_000


@pytest.mark.timeout(60)
def test_a_fault_outside_a_huge_working_set_is_answered_while_it_streams_in(
    tmp_path: Path,
) -> None:
    values = np.arange(1, PAGES * PAGE // 8 + 1, dtype=np.int64)  # no zero, position-dependent
    record = tmp_path / "working-set"
    offsets = (np.arange(RECORDS, dtype=np.uint64) % WORKING) * PAGE
    pairs = np.stack([offsets, np.full(RECORDS, PAGE, dtype=np.uint64)], axis=1)
    record.write_bytes(pairs.astype("<u8").tobytes())
    assert record.stat().st_size == RECORDS * 16

    def body() -> tuple[list[int], int]:
        mapping = memory.anonymous(PAGES * PAGE)
        with serve([mapping], BytesStore(values.tobytes()), policy=Single(),
                   prefetch=str(record), prefetch_timeout=0) as server:  # fmt: skip
            page = WORKING + 1000  # outside the working set
            got = list(struct.unpack_from("<4q", mapping.view, page * PAGE))
            prefetched = server.stats().prefetched
        return got, prefetched

    got, prefetched = in_target(body, timeout=50)
    want = [int(v) for v in values[(WORKING + 1000) * PAGE // 8 :][:4]]
    assert got == want, f"page {WORKING + 1000} began {got}, not {want}"
    # Answered before the working set was all in: the fault did not wait behind the file.
    assert prefetched < WORKING, f"{prefetched} of {WORKING} pages were prefetched first"


def _touch_and_record(record: Path, pages: list[int]) -> list[str]:
    values = np.arange(1, 64 * PAGE // 8 + 1, dtype=np.int64)
    mapping = memory.anonymous(64 * PAGE)
    wrong = []
    with serve([mapping], BytesStore(values.tobytes()), policy=Single(), record=str(record)):
        for page in pages:
            (got,) = struct.unpack_from("<q", mapping.view, page * PAGE)
            if got != page * PAGE // 8 + 1:
                wrong.append(f"page {page} began {got}")
    return wrong


@pytest.mark.timeout(60)
def test_a_recording_replaces_the_last_one_when_it_ends(tmp_path: Path) -> None:
    record = tmp_path / "ws"
    for pages in ([1, 2, 3, 4, 5, 6], [40, 41]):
        wrong = in_target(functools.partial(_touch_and_record, record, pages), timeout=30)
        assert not wrong, wrong
        records = [struct.unpack_from("<QQ", record.read_bytes(), i) for i in
                   range(0, record.stat().st_size, 16)]  # fmt: skip
        # (Each fault's page is recorded first with length 0, then the window it filled.)
        windows = [offset // PAGE for offset, length in records if length]
        faults = [offset // PAGE for offset, length in records if not length]
        assert windows == pages and faults == pages, records
    assert not (tmp_path / "ws.partial").exists(), "the recording in progress was left behind"


@pytest.mark.parametrize("where", ["missing-directory", "a-directory"])
def test_a_record_path_that_cannot_be_written_is_refused_up_front(
    tmp_path: Path, where: str
) -> None:
    record = tmp_path / "nowhere" / "ws" if where == "missing-directory" else tmp_path
    mapping = memory.anonymous(4 * PAGE)
    try:
        expected = FileNotFoundError if where == "missing-directory" else IsADirectoryError
        with pytest.raises(expected) as raised:
            serve([mapping], BytesStore(bytes(range(1, 256)) * 64 * 4), record=str(record))
        assert str(record) in str(raised.value), raised.value
    finally:
        mapping.close()


class _Unreadable(BytesStore):
    """Page 5 cannot be read."""

    def read_range(self, offset: int, view: memoryview) -> None:
        if offset <= 5 * PAGE < offset + len(view):
            raise StoreError(errno.EIO, "page 5 is on a bad sector")
        super().read_range(offset, view)


@pytest.mark.timeout(60)
def test_why_a_page_was_poisoned_reaches_a_program_whose_stderr_is_a_pipe() -> None:
    def body() -> tuple[int, str, str]:
        _read_end, write_end = os.pipe()
        os.dup2(write_end, 2)  # the handler's log has nowhere to go (the launch drops a pipe)
        mapping = memory.anonymous(16 * PAGE)
        with serve([mapping], _Unreadable(bytes(range(1, 256)) * 16 * 16), policy=Single()) as s:
            reader = os.fork()
            if reader == 0:
                struct.unpack_from("<q", mapping.view, 5 * PAGE)  # SIGBUS
                os._exit(0)
            _pid, status = os.waitpid(reader, 0)
            stats = s.stats()
        os.close(write_end)
        return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, stats.last_error, ""

    signal_number, last_error, _ = in_target(body, timeout=50)
    assert signal_number == signal.SIGBUS, f"the reader ended with signal {signal_number}"
    assert "page 5 is on a bad sector" in last_error, f"last_error: {last_error!r}"


def _registered_ranges(pid: int) -> int:
    """How many of ``pid``'s ranges are registered with a userfaultfd (smaps VmFlags um)."""
    with open(f"/proc/{pid}/smaps") as f:
        return sum(1 for line in f if line.startswith("VmFlags:") and " um" in line)


@pytest.mark.timeout(60)
def test_later_servers_carry_no_copy_of_earlier_arrays() -> None:
    """A server forked from a program with arrays used to carry copies of them, served by their
    handlers: every earlier handler then lived as long as every later server, and a program
    exiting with 50 arrays saw its daemons go one probe period at a time (8 s)."""

    def body() -> list[str]:
        values = np.arange(1, 64 * PAGE // 8 + 1, dtype=np.int64).tobytes()
        servers, mappings, wrong = [], [], []
        for _ in range(3):
            mapping = memory.anonymous(64 * PAGE)
            servers.append(serve([mapping], BytesStore(values), policy=Single()))
            mappings.append(mapping)
        for k, server in enumerate(servers):
            for role, pid in (("supervisor", server.pid), ("handler", server.handler_pid)):
                if (count := _registered_ranges(pid)) != 0:
                    wrong.append(f"array {k}'s {role} has {count} registered ranges")
        for k, mapping in enumerate(mappings):
            (got,) = struct.unpack_from("<q", mapping.view, 7 * PAGE)
            if got != 7 * PAGE // 8 + 1:
                wrong.append(f"array {k}: page 7 began {got}")
        for server in servers:
            server.stop()
        return wrong

    wrong = in_target(body, timeout=50)
    assert not wrong, wrong

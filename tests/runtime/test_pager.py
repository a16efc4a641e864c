"""The pager's bookkeeping without a kernel fault: a budget it cannot keep (every page dirty
and the store refusing writes) costs memory over the budget, never a handler that spins."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from userfaultfd.runtime import _stats
from userfaultfd.runtime._fill import Outcome
from userfaultfd.runtime._pager import CLEAN, DIRTY, Pager, PagerSetup
from userfaultfd.runtime._stats import StatsBlock
from userfaultfd.stores import BytesStore, StoreError

PAGE = mmap.PAGESIZE
PAGES = 8


class FullDisk(BytesStore):
    """Reads its bytes; every write fails with ENOSPC."""

    @property
    def writable(self) -> bool:
        return True

    def write_from(self, offset: int, data: memoryview) -> None:
        raise StoreError(errno.ENOSPC, "No space left on device")


def _pager(store: BytesStore, memfd: int) -> tuple[Pager, StatsBlock]:
    setup = PagerSetup(memfd=memfd, length=PAGES * PAGE, offset=0, page=PAGE, budget_pages=4,
                       unit_pages=2, writable=True, states=mmap.mmap(-1, PAGES))  # fmt: skip
    stats = StatsBlock()
    return Pager(setup, store, stats, {}), stats


@pytest.mark.timeout(10)
def test_room_that_cannot_be_made_is_not_waited_for() -> None:
    data = bytes((i % 251) + 1 for i in range(PAGES * PAGE))
    memfd = os.memfd_create("pager-test")
    try:
        os.ftruncate(memfd, PAGES * PAGE)
        pager, stats = _pager(FullDisk(data), memfd)
        os.pwrite(memfd, data[: 4 * PAGE], 0)
        pager._mark_in(0, 4)  # four pages in memory, then written by the program
        pager.setup.states[0:4] = bytes([DIRTY]) * 4
        assert pager.admit(2) is Outcome.DONE  # (it spun here for ever)
        assert pager.resident == 4, f"{pager.resident} pages resident, 4 dirty ones expected"
        assert bytes(pager.setup.states[0:4]) == bytes([DIRTY]) * 4, "a dirty page was dropped"
        assert stats.value(_stats.WRITE_ERRORS) >= 2, "the failed write-backs were not counted"
        assert os.pread(memfd, 4 * PAGE, 0) == data[: 4 * PAGE], "a page lost its bytes"
        assert pager.flush() == errno.ENOSPC, "flush() did not report the full disk"
    finally:
        os.close(memfd)


@pytest.mark.timeout(10)
def test_clean_pages_go_first_in_order_and_leave_the_memfd() -> None:
    data = bytes((i % 251) + 1 for i in range(PAGES * PAGE))
    memfd = os.memfd_create("pager-test")
    try:
        os.ftruncate(memfd, PAGES * PAGE)
        pager, stats = _pager(BytesStore(data), memfd)
        os.pwrite(memfd, data[: 4 * PAGE], 0)
        pager._mark_in(0, 2)
        pager._mark_in(2, 4)
        assert pager.admit(2) is Outcome.DONE
        assert bytes(pager.setup.states[0:4]) == bytes([0, 0, CLEAN, CLEAN]), (
            f"the oldest unit did not go first: states {list(pager.setup.states[0:4])}"
        )
        assert os.pread(memfd, PAGE, 0) == bytes(PAGE), "the evicted page is still in the memfd"
        assert stats.value(_stats.EVICTED) == 2 and pager.resident == 2
    finally:
        os.close(memfd)

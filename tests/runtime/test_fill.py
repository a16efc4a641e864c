"""The filler alone, against a fake uffd that records each ioctl and answers as the kernel would.

No kernel and no sleeps: what COPY, EEXIST, EAGAIN (with the bytes done) and ESRCH make the
filler do to the map, the counters and the outcome it reports. The filler never releases a
source; it names the ones found gone.
"""

from __future__ import annotations

import ctypes
import errno
from collections import deque
from typing import cast

import pytest

from userfaultfd import Userfaultfd
from userfaultfd._errors import (
    MappingChangedError,
    PageExistsError,
    ProcessGoneError,
    UserfaultfdError,
)
from userfaultfd.runtime import _stats
from userfaultfd.runtime._fill import Fill, Filler, Outcome, Source
from userfaultfd.runtime._ranges import RegionMap, RegionState
from userfaultfd.runtime._stats import StatsBlock
from userfaultfd.stores import BytesStore, StoreError

PAGE = 4096
BASE = 0x7F0000000000
PAGES = 8


def _data(pages: int = PAGES) -> bytes:
    """Position-dependent bytes with no zero byte: page i, byte j holds 1 + (i * 7 + j) % 251."""
    return bytes(1 + (i * 7 + j) % 251 for i in range(pages) for j in range(PAGE))


class FakeUffd:
    """Records (op, address, length, bytes copied) and raises what ``answers`` queue holds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, bytes]] = []
        self.answers: deque[BaseException | None] = deque()
        self.closed = False

    def _answer(self) -> None:
        if self.answers and (err := self.answers.popleft()) is not None:
            raise err

    def copy(
        self, address: int, src: int, length: int, *, wp: bool = False, wake: bool = True
    ) -> int:
        assert not wp, "a fill protects pages only for an out-of-core array's pager"
        self.calls.append(("copy", address, length, ctypes.string_at(src, length)))
        self._answer()
        return length

    def poison(self, address: int, length: int, *, wake: bool = True) -> int:
        self.calls.append(("poison", address, length, b""))
        self._answer()
        return length

    def wake(self, address: int, length: int) -> None:
        self.calls.append(("wake", address, length, b""))


def _changed(done: int) -> MappingChangedError:
    err = MappingChangedError(errno.EAGAIN, "UFFDIO_COPY: an event is pending")
    err.done = done
    return err


def _setup(data: bytes | None = None) -> tuple[Filler, Source, RegionState, FakeUffd, StatsBlock]:
    stats = StatsBlock()
    filler = Filler(BytesStore(_data() if data is None else data), stats, 16 * PAGE)
    uffd = FakeUffd()
    region = RegionState(BASE, PAGES * PAGE, 0, PAGE)
    source = Source(1, cast(Userfaultfd, uffd), RegionMap([region]))
    return filler, source, region, uffd, stats


def _expect_bytes(call: tuple[str, int, int, bytes], data: bytes) -> None:
    _op, address, length, copied = call
    offset = address - BASE
    want = data[offset : offset + length]
    if copied != want:
        bad = next(i for i in range(length) if copied[i] != want[i])
        pytest.fail(f"COPY to page {(offset + bad) // PAGE}: byte {bad % PAGE} held "
                    f"{copied[bad]}, not {want[bad]}")  # fmt: skip


def test_a_fill_copies_the_store_bytes_of_its_pages_in_one_copy() -> None:
    filler, source, region, uffd, stats = _setup()
    try:
        assert filler.fill(source, region, 2, 6, must=(2, 3)) is Outcome.DONE
        assert [c[:3] for c in uffd.calls] == [("copy", BASE + 2 * PAGE, 4 * PAGE)]
        _expect_bytes(uffd.calls[0], _data())
        assert bytes(region.settled) == bytes([0, 0, 1, 1, 1, 1, 0, 0]), region.settled
        assert (stats.value(_stats.PAGES), stats.value(_stats.COPIES)) == (4, 1)
    finally:
        filler.close()


def test_eexist_settles_and_wakes_the_first_page_and_copies_on_from_the_next() -> None:
    filler, source, region, uffd, stats = _setup()
    uffd.answers.extend([PageExistsError(errno.EEXIST, "there"), None])
    try:
        assert filler.place(source, region, 0, 4, Fill.COPY, filler.buffer(_data()[: 4 * PAGE]))
        ops = [c[:3] for c in uffd.calls]
        assert ops == [("copy", BASE, 4 * PAGE), ("wake", BASE, PAGE),
                       ("copy", BASE + PAGE, 3 * PAGE)], ops  # fmt: skip
        _expect_bytes(uffd.calls[2], _data())
        assert bytes(region.settled[:4]) == b"\x01" * 4, region.settled
        # The page another fill put there is not counted as filled by this one.
        assert (stats.value(_stats.PAGES), stats.value(_stats.WAKES)) == (3, 1)
    finally:
        filler.close()


def test_eagain_settles_only_the_pages_done_and_reports_changed() -> None:
    filler, source, region, uffd, stats = _setup()
    uffd.answers.append(_changed(2 * PAGE))
    try:
        outcome = filler.place(source, region, 1, 5, Fill.COPY, filler.buffer(_data()[PAGE:]))
        assert outcome is Outcome.CHANGED
        assert bytes(region.settled) == bytes([0, 1, 1, 0, 0, 0, 0, 0]), region.settled
        assert stats.value(_stats.PAGES) == 2, stats.value(_stats.PAGES)
        assert not filler.gone
    finally:
        filler.close()


def test_esrch_reports_the_source_gone_and_never_releases_it() -> None:
    filler, source, region, uffd, stats = _setup()
    uffd.answers.append(ProcessGoneError(errno.ESRCH, "gone"))
    try:
        assert filler.fill(source, region, 0, 2, must=(0, 1)) is Outcome.PROCESS_GONE
        assert filler.gone == [source]
        assert not uffd.closed, "the filler closed a source: only the loop releases"
        assert bytes(region.settled) == bytes(PAGES), region.settled
        assert stats.value(_stats.PAGES) == 0, stats.value(_stats.PAGES)
    finally:
        filler.close()


def test_enoent_settles_the_pages_of_a_range_unmapped_meanwhile() -> None:
    filler, source, region, uffd, _stats_block = _setup()
    uffd.answers.append(UserfaultfdError(errno.ENOENT, "unmapped"))
    try:
        assert filler.fill(source, region, 3, 5, must=(3, 4)) is Outcome.DONE
        assert bytes(region.settled) == bytes([0, 0, 0, 1, 1, 0, 0, 0]), region.settled
    finally:
        filler.close()


class _FailingStore(BytesStore):
    """Fails every read that covers page ``bad``."""

    def __init__(self, data: bytes, bad: int) -> None:
        super().__init__(data)
        self.bad = bad

    def read_range(self, offset: int, view: memoryview) -> None:
        if offset <= self.bad * PAGE < offset + len(view):
            raise StoreError(errno.EIO, f"page {self.bad} is unreadable")
        super().read_range(offset, view)


def test_a_store_failure_poisons_only_the_waited_page_and_leaves_its_neighbours() -> None:
    data = _data()
    stats = StatsBlock()
    filler = Filler(_FailingStore(data, bad=5), stats, 16 * PAGE)
    uffd = FakeUffd()
    region = RegionState(BASE, PAGES * PAGE, 0, PAGE)
    source = Source(1, cast(Userfaultfd, uffd), RegionMap([region]))
    try:
        # The fault is on page 5, inside a window [4, 8) whose read failed: page 5 alone is
        # asked for again and poisoned; 4, 6 and 7 are left unsettled for their own faults.
        assert filler.fill(source, region, 4, 8, must=(5, 6)) is Outcome.DONE
        poisoned = [c[1] for c in uffd.calls if c[0] == "poison"]
        assert poisoned == [BASE + 5 * PAGE], [hex(a) for a in poisoned]
        assert not [c for c in uffd.calls if c[0] == "copy"], "copied bytes the store refused"
        assert bytes(region.settled) == bytes([0, 0, 0, 0, 0, 1, 0, 0]), region.settled
        assert stats.value(_stats.POISONED) == 1, stats.value(_stats.POISONED)
    finally:
        filler.close()


def test_a_failed_read_nobody_waits_on_settles_nothing() -> None:
    filler = Filler(_FailingStore(_data(), bad=6), StatsBlock(), 16 * PAGE)
    uffd = FakeUffd()
    region = RegionState(BASE, PAGES * PAGE, 0, PAGE)
    source = Source(1, cast(Userfaultfd, uffd), RegionMap([region]))
    try:
        assert filler.fill(source, region, 4, 8, must=(0, 0)) is Outcome.DONE
        assert not uffd.calls, uffd.calls
        assert bytes(region.settled) == bytes(PAGES), region.settled
    finally:
        filler.close()

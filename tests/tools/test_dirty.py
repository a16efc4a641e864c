"""Dirty tracking (WP_ASYNC + PAGEMAP_SCAN) and incremental snapshots, on the running kernel.

These tests write tracked memory from the pytest process itself: with WP_ASYNC the kernel resolves
write-protect faults on its own, so no write ever waits for a handler. The timeouts are a backstop.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests._target import PAGE, Channel, Target, page_difference
from userfaultfd import FeatureUnavailableError, memory
from userfaultfd.tools import (
    DirtyStats,
    _dirty,
    restore,
    snapshot_delta,
    snapshot_full,
    track,
)

pytestmark = pytest.mark.timeout(60)

HUGE_PMD = 2 << 20  # one page table of 4 KiB pages maps 2 MiB on x86-64

Maker = Callable[[int], memory.Mapping]
KINDS: dict[str, Maker] = {
    "anonymous": memory.anonymous,
    "shmem": memory.memfd,
}


@pytest.fixture(params=sorted(KINDS))
def make(request: pytest.FixtureRequest) -> Iterator[Maker]:
    """A maker of tracked-memory candidates of each kind; closes what it made."""
    made: list[memory.Mapping] = []

    def maker(length: int) -> memory.Mapping:
        mapping = KINDS[request.param](length)
        made.append(mapping)
        return mapping

    yield maker
    for mapping in made:
        mapping.close()


def _native_write(arr: np.ndarray, pages: np.ndarray, value: int) -> None:
    # One fancy-index assignment: NumPy's C loop does every write, no Python code per page.
    arr[pages * PAGE + (pages % PAGE)] = value


# -- exactness -------------------------------------------------------------------------------------
def test_python_writes_are_reported_exactly(make: Maker) -> None:
    m = make(512 * PAGE)
    m.view[: 100 * PAGE] = b"\1" * (100 * PAGE)  # some pages present before tracking starts
    pages = sorted(random.Random(1).sample(range(512), 60))
    with track(m) as tracker:
        assert tracker.dirty() == []
        for page in pages:
            m.view[page * PAGE + 17] = 0xAB
        assert tracker.dirty() == pages
        assert tracker.dirty() == []


def test_native_writes_are_reported_exactly(make: Maker) -> None:
    m = make(4096 * PAGE)
    arr = m.numpy()
    arr[: 1000 * PAGE] = 1
    pages = np.sort(np.random.default_rng(2).choice(4096, size=700, replace=False))
    with track(m) as tracker:
        _native_write(arr, pages, 9)
        expected = pages.tolist()
        # Looking does not reset: the same set twice.
        assert tracker.dirty(reset=False) == expected
        assert tracker.dirty(reset=False) == expected
        assert tracker.dirty() == expected
        assert tracker.dirty() == []
        assert tracker.dirty(reset=False) == []
    assert (arr[pages * PAGE + (pages % PAGE)] == 9).all()


def test_never_touched_page_is_reported(make: Maker) -> None:
    """WP_UNPOPULATED: a page with no page-table entry at all is protected, so its write counts."""
    m = make(64 * PAGE)
    with track(m) as tracker:
        assert m.view[40 * PAGE] == 0  # a read of a never-touched page is not a write
        m.view[41 * PAGE] = 1
        assert tracker.dirty() == [41]


def test_runs_and_a_page_written_twice(make: Maker) -> None:
    m = make(64 * PAGE)
    with track(m) as tracker:
        for page in (2, 3, 4, 10, 63, 3):
            m.view[page * PAGE] = page
        assert tracker.dirty_ranges(reset=False) == [(2, 5), (10, 11), (63, 64)]
        assert tracker.dirty() == [2, 3, 4, 10, 63]


def test_kernel_writes_are_tracked(make: Maker) -> None:
    """read(2) into tracked memory: the kernel's own write takes the same async path."""
    m = make(16 * PAGE)
    with track(m) as tracker:
        reader, writer = os.pipe()
        try:
            os.write(writer, b"from the kernel")
            assert os.readv(reader, [m.view[5 * PAGE + 3 : 5 * PAGE + 18]]) == 15
        finally:
            os.close(reader)
            os.close(writer)
        assert tracker.dirty() == [5]
    assert bytes(m.view[5 * PAGE + 3 : 5 * PAGE + 18]) == b"from the kernel"


def test_a_bare_range_is_tracked_alone() -> None:
    """(address, length): only that range is tracked, and ``view`` reaches its bytes."""
    with (
        memory.anonymous(32 * PAGE) as m,
        track((m.address + 8 * PAGE, 8 * PAGE)) as tracker,
    ):
        m.view[0] = 1  # outside the tracked range
        m.view[9 * PAGE] = 2  # page 1 of the range
        m.view[31 * PAGE] = 3  # outside
        assert tracker.dirty() == [1]
        assert tracker.view[PAGE] == 2 and len(tracker.view) == 8 * PAGE


def test_stats_count_scans_pages_and_time() -> None:
    with memory.anonymous(32 * PAGE) as m, track(m) as tracker:
        assert tracker.stats() == DirtyStats(0, 0, 0.0)
        m.view[0] = m.view[PAGE] = m.view[9 * PAGE] = 1
        tracker.dirty()
        tracker.dirty()
        stats = tracker.stats()
        assert (stats.scans, stats.pages) == (2, 3)
        assert 0 < stats.seconds < 1
        with pytest.raises(AttributeError):
            stats.scans = 5  # type: ignore[misc]


def test_close_is_idempotent_and_stops_tracking() -> None:
    with memory.anonymous(8 * PAGE) as m:
        tracker = track(m)
        tracker.close()
        tracker.close()
        assert tracker.closed
        m.view[0] = 1  # unregistered: a plain write
        with pytest.raises(ValueError, match="closed"):
            tracker.dirty()


def test_a_misaligned_range_is_refused() -> None:
    with memory.anonymous(8 * PAGE) as m, pytest.raises(ValueError, match="multiples of"):
        track((m.address + 1, PAGE))


def test_a_kernel_without_wp_async_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise FeatureUnavailableError(22, "this kernel (6.6) lacks WP_ASYNC (Linux 6.7)")

    monkeypatch.setattr(_dirty, "Userfaultfd", refuse)
    needs = r"dirty tracking needs .*WP_ASYNC.*lacks WP_ASYNC"
    with memory.anonymous(PAGE) as m, pytest.raises(FeatureUnavailableError, match=needs):
        track(m)


# -- a concurrent writer ---------------------------------------------------------------------------
def test_a_concurrent_writer_loses_no_page(make: Maker) -> None:
    """Native writes in a thread while dirty() runs: every written page is reported, nothing else.

    NumPy releases the GIL in its fancy-assignment loop and fcntl.ioctl releases it around
    PAGEMAP_SCAN, so on two CPUs writes land during the walks. Only even pages are written:
    an odd page showing up would be a false report.
    """
    m = make(16384 * PAGE)
    arr = m.numpy()
    rng = np.random.default_rng(3)
    batches = [rng.choice(8192, size=1000, replace=False) * 2 for _ in range(60)]
    written = set(np.concatenate(batches).tolist())
    finished = threading.Event()

    def writer() -> None:
        for k, batch in enumerate(batches):
            _native_write(arr, batch, k + 1)
        finished.set()

    reported: set[int] = set()
    busy_scans = 0
    with track(m) as tracker:
        thread = threading.Thread(target=writer)
        thread.start()
        while not finished.is_set():
            pages = tracker.dirty()
            busy_scans += bool(pages)
            reported.update(pages)
        thread.join()
        reported.update(tracker.dirty())
        assert tracker.dirty() == []
    assert reported == written
    assert busy_scans >= 2, "the writer finished before the scans overlapped it"


# -- what the kernel reports besides writes --------------------------------------------------------
def _aligned_table(m: memory.Mapping) -> int:
    """Offset of the first 2 MiB-aligned, 2 MiB-long stretch of ``m`` (one whole page table)."""
    offset = -m.address % HUGE_PMD
    assert offset + HUGE_PMD <= m.length
    return offset


def test_madv_dontneed_on_anonymous_memory_is_reported_once() -> None:
    """Observed on Linux 6.18: MADV_DONTNEED on tracked anonymous memory drops the page and its
    uffd-wp protection with it (mm/memory.c, zap_install_uffd_wp_if_needed: "Zap on anonymous
    always means dropping everything"); PAGEMAP_SCAN then reports the page as written, whether it
    was written, clean or never touched, until a reset scan protects it again. The page now reads
    zeros, so for a delta that report is the right one. A whole dropped page table (PT_RECLAIM may
    free it) is reported the same way.
    """
    with memory.anonymous(1536 * PAGE) as m, track(m) as tracker:
        m.view[3 * PAGE] = 1
        m.view[5 * PAGE] = 1
        assert tracker.dirty() == [3, 5]
        m.view[7 * PAGE] = 1  # written, then dropped before any scan
        for page in (5, 6, 7, 200):  # written-then-reset, never touched, written, never touched
            m.madvise(mmap.MADV_DONTNEED, page * PAGE, PAGE)
        assert tracker.dirty(reset=False) == [5, 6, 7, 200]
        assert tracker.dirty() == [5, 6, 7, 200]
        assert tracker.dirty() == []
        assert m.view[5 * PAGE] == 0 and m.view[3 * PAGE] == 1
        m.view[200 * PAGE] = 2  # protection is back on the dropped page: its write counts
        assert tracker.dirty() == [200]

        offset = _aligned_table(m)
        first = offset // PAGE
        m.view[offset + 10 * PAGE] = 4
        tracker.dirty()
        m.madvise(mmap.MADV_DONTNEED, offset, HUGE_PMD)
        assert tracker.dirty() == list(range(first, first + HUGE_PMD // PAGE))
        assert tracker.dirty() == []
        m.view[offset + PAGE] = 5
        assert tracker.dirty() == [first + 1]


def test_madvise_that_keeps_anonymous_contents_is_not_reported() -> None:
    """MADV_FREE and MADV_PAGEOUT keep the data and the protection: nothing reported."""
    madv_pageout = getattr(mmap, "MADV_PAGEOUT", 21)
    with memory.anonymous(16 * PAGE) as m:
        m.view[:] = b"\7" * m.length
        with track(m) as tracker:
            m.madvise(mmap.MADV_FREE, 2 * PAGE, 2 * PAGE)
            m.madvise(madv_pageout, 6 * PAGE, 2 * PAGE)
            assert tracker.dirty() == []
            assert m.view[6 * PAGE] == 7


def test_shmem_drops_that_keep_or_lose_data_are_not_reported() -> None:
    """Observed on Linux 6.18, shmem (memfd): MADV_DONTNEED only unmaps (the page cache keeps the
    data; the zap leaves a uffd-wp marker): not reported, and right not to be. PUNCH_HOLE and
    MADV_REMOVE do turn pages to zeros, and are not reported either; nor is a write through another
    mapping of the memfd. The module docstring warns about these.
    """
    with memory.memfd(32 * PAGE) as m:
        m.view[:] = b"\7" * m.length
        with track(m) as tracker, m.alias() as alias:
            m.madvise(mmap.MADV_DONTNEED, 2 * PAGE, PAGE)
            assert tracker.dirty() == []
            assert m.view[2 * PAGE] == 7
            m.punch_hole(4 * PAGE, 2 * PAGE)
            m.madvise(mmap.MADV_REMOVE, 8 * PAGE, PAGE)
            alias.view[10 * PAGE] = 1
            assert tracker.dirty() == []
            assert (m.view[4 * PAGE], m.view[8 * PAGE], m.view[10 * PAGE]) == (0, 0, 1)
            m.view[4 * PAGE] = 3  # a write through the tracked mapping still counts
            assert tracker.dirty() == [4]


def test_hugetlb_pages_are_tracked_in_huge_page_units(hugepages: int, huge_page: int) -> None:
    with memory.hugetlb(4 * huge_page) as m, track(m) as tracker:
        assert tracker.page_size == huge_page
        m.view[huge_page + 5] = 1
        m.view[3 * huge_page] = 1
        assert tracker.dirty() == [1, 3]
        assert tracker.dirty() == []


# -- other processes -------------------------------------------------------------------------------
def test_a_forked_child_tracks_its_own_memory() -> None:
    def body(channel: Channel) -> None:
        with memory.anonymous(64 * PAGE) as m, track(m) as tracker:
            m.numpy()[np.array([3, 40]) * PAGE] = 1
            m.view[7 * PAGE] = 1
            channel.send((tracker.dirty(), tracker.dirty()))

    with Target(body) as target:
        (first, second), _ = target.recv()
        assert first == [3, 7, 40]
        assert second == []
        assert target.exit_code() == 0


def test_fork_leaves_the_parents_tracking_in_place() -> None:
    """Without EVENT_FORK the child loses the registration; the parent keeps tracking."""
    with memory.anonymous(16 * PAGE) as m, track(m) as tracker:
        m.view[2 * PAGE] = 1
        tracker.dirty()

        def body(channel: Channel) -> None:
            m.view[3 * PAGE] = 9  # the child's own copy
            channel.send(m.view[3 * PAGE])

        with Target(body) as target:
            assert target.recv()[0] == 9
            assert target.exit_code() == 0
        m.view[2 * PAGE] = 2  # copy-on-write of a page shared with the (gone) child
        assert tracker.dirty() == [2]
        assert m.view[3 * PAGE] == 0


# -- incremental snapshots -------------------------------------------------------------------------
def test_base_and_deltas_restore_the_final_memory(make: Maker, tmp_path: Path) -> None:
    m = make(2048 * PAGE)
    arr = m.numpy()
    rng = np.random.default_rng(4)
    arr[: 300 * PAGE] = rng.integers(0, 256, 300 * PAGE, dtype=np.uint8)
    deltas: list[Path] = []
    with track(m) as tracker:
        arr[5 * PAGE] = 1  # before the base: in the base, not in any delta
        snapshot_full(tracker, tmp_path / "base")
        assert (tmp_path / "base").stat().st_size == m.length
        for round_ in range(5):
            pages = rng.choice(2048, size=int(rng.integers(1, 200)), replace=False)
            _native_write(arr, pages, round_ + 100)
            m.view[(round_ * 7) * PAGE : (round_ * 7 + 3) * PAGE] = bytes([round_]) * (3 * PAGE)
            deltas.append(tmp_path / f"delta{round_}")
            info = snapshot_delta(tracker, deltas[-1])
            expected = set(pages.tolist()) | set(range(round_ * 7, round_ * 7 + 3))
            assert info.pages == len(expected)
            assert info.bytes == deltas[-1].stat().st_size == 32 + len(expected) * (8 + PAGE) + 16
        assert tracker.dirty() == []
    with restore(tmp_path / "base", deltas) as restored:
        assert restored.length == m.length
        assert page_difference(restored.view, m.view) == ""
    with restore(tmp_path / "base", deltas[:2]) as partial:
        assert page_difference(partial.view, m.view).startswith("page "), "later deltas missing"
    with restore(tmp_path / "base") as base, memory.anonymous(m.length) as into:
        assert base.view[5 * PAGE] == 1
        assert restore(tmp_path / "base", deltas, into=into) is into
        assert page_difference(into.view, m.view) == ""


def test_a_snapshot_of_a_bare_mapping_is_its_bytes(tmp_path: Path) -> None:
    with memory.anonymous(4 * PAGE) as m:
        m.view[:] = os.urandom(m.length)
        snapshot_full(m, tmp_path / "image")
        assert page_difference((tmp_path / "image").read_bytes(), m.view) == ""


def test_delta_file_format(tmp_path: Path) -> None:
    """The documented layout, read back by hand."""
    with memory.anonymous(16 * PAGE) as m, track(m) as tracker:
        m.view[9 * PAGE : 10 * PAGE] = b"\x09" * PAGE
        m.view[2 * PAGE : 3 * PAGE] = b"\x02" * PAGE
        snapshot_delta(tracker, tmp_path / "d")
    data = (tmp_path / "d").read_bytes()
    assert struct.unpack_from("<8sQQQ", data) == (b"UFFDDLT1", PAGE, 16 * PAGE, 2)
    assert struct.unpack_from("<2Q", data, 32) == (2, 9)
    assert data[48 : 48 + 2 * PAGE] == b"\x02" * PAGE + b"\x09" * PAGE
    assert data[-16:] == hashlib.blake2b(data[:-16], digest_size=16).digest()
    assert len(data) == 48 + 2 * PAGE + 16


def _chain(tmp_path: Path, pages: int, name: str) -> tuple[Path, Path]:
    """A base image and one delta of a ``pages``-page region."""
    with memory.anonymous(pages * PAGE) as m, track(m) as tracker:
        snapshot_full(tracker, tmp_path / f"{name}.base")
        m.view[PAGE] = 1
        snapshot_delta(tracker, tmp_path / f"{name}.delta")
    return tmp_path / f"{name}.base", tmp_path / f"{name}.delta"


def test_a_corrupted_delta_is_refused_by_name(tmp_path: Path) -> None:
    base, delta = _chain(tmp_path, 8, "a")
    data = bytearray(delta.read_bytes())
    data[40 + PAGE // 2] ^= 0x01  # one bit of the page data
    delta.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{delta}: checksum mismatch"):
        restore(base, [delta])
    delta.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=rf"{delta}: checksum"):
        restore(base, [delta])


def test_a_delta_of_another_region_is_refused(tmp_path: Path) -> None:
    base, _ = _chain(tmp_path, 8, "a")
    _, other = _chain(tmp_path, 16, "b")
    with pytest.raises(ValueError, match=rf"{other}: a delta of a {16 * PAGE}-byte region"):
        restore(base, [other])


def test_a_chain_mixing_page_sizes_is_refused(tmp_path: Path) -> None:
    base, delta = _chain(tmp_path, 8, "a")
    data = delta.read_bytes()
    # The same pages re-described as one 2-page unit: valid alone, foreign to this chain.
    magic, _unit, region, _count = struct.unpack_from("<8sQQQ", data)
    body = struct.pack("<8sQQQ", magic, 2 * PAGE, region, 1) + struct.pack("<Q", 0)
    body += bytes(2 * PAGE)
    forged = tmp_path / "forged"
    forged.write_bytes(body + hashlib.blake2b(body, digest_size=16).digest())
    with restore(base, [forged]) as alone:
        assert alone.view[PAGE] == 0
    with pytest.raises(ValueError, match=rf"{forged}: page size {2 * PAGE} differs"):
        restore(base, [delta, forged])


def test_a_failed_restore_leaves_into_untouched(tmp_path: Path) -> None:
    base, delta = _chain(tmp_path, 8, "a")
    data = bytearray(delta.read_bytes())
    data[0] ^= 0xFF
    delta.write_bytes(bytes(data))
    with memory.anonymous(8 * PAGE) as into:
        into.view[0] = 42
        with pytest.raises(ValueError, match="checksum"):
            restore(base, [delta], into=into)
        assert into.view[0] == 42  # deltas are all checked before anything is written

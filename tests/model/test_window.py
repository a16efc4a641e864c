"""do_fault_around()'s window: natural alignment; clipped to the VMA, the page table, i_size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userfaultfd.model import PAGE_SIZE, PTRS_PER_PTE, Kernel, SigBusError

PMD = PTRS_PER_PTE * PAGE_SIZE
BASE = 0x1000_0000  # PMD aligned


def test_live_kernel_fact_64_page_memfd_no_uffd_maps_the_aligned_16() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(64, cached=range(64))
    v = k.mmap(f, BASE, 64)
    assert k.read(v, 20) == "p20"
    assert k.mapped(v) == set(range(16, 32))


def test_window_is_naturally_aligned_on_the_virtual_address_not_the_vma() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(64, cached=range(64))
    v = k.mmap(f, BASE + 4 * PAGE_SIZE, 40)  # VMA starts 4 pages into an aligned 16-page block
    k.read(v, 20)  # virtual page 24 of the block row: window 16..31 -> VMA pages 12..27
    assert k.mapped(v) == set(range(12, 28))


def test_window_clips_to_vma_start_and_end() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(64, cached=range(64))
    v = k.mmap(f, BASE + 4 * PAGE_SIZE, 6)
    assert k.fault_around_window(v, 0) == range(0, 6)
    k.read(v, 0)
    assert k.mapped(v) == set(range(6))


def test_window_clips_to_the_page_table() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(16, cached=range(16))
    v = k.mmap(f, BASE + PMD - 4 * PAGE_SIZE, 8)  # 4 pages before a PMD boundary, 4 after
    assert k.fault_around_window(v, 0) == range(0, 4)
    assert k.fault_around_window(v, 5) == range(4, 8)
    k.read(v, 1)
    assert k.mapped(v) == {0, 1, 2, 3}


def test_whole_table_window_still_stops_at_the_table() -> None:
    k = Kernel("pre-patch", fault_around_bytes=PMD)
    f = k.shmem_file(100, cached=range(100))
    v = k.mmap(f, BASE + 500 * PAGE_SIZE, 100)
    assert k.fault_around_window(v, 0) == range(0, 12)
    assert k.fault_around_window(v, 20) == range(12, 100)


def test_window_clips_to_i_size_and_beyond_is_sigbus() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(10, cached=range(10))
    v = k.mmap(f, BASE, 16)
    assert k.fault_around_window(v, 2) == range(0, 10)
    k.read(v, 2)
    assert k.mapped(v) == set(range(10))
    with pytest.raises(SigBusError):
        k.read(v, 12)


def test_window_walks_file_offsets_from_pgoff() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(32, cached=range(32))
    v = k.mmap(f, BASE, 8, pgoff=20)
    assert k.fault_around_window(v, 3) == range(0, 8)
    assert k.read(v, 3) == "p23"
    assert k.read(v, 0) == "p20"  # mapped by the fault-around of the first read
    # filemap_map_pages clips to i_size in file pages: pgoff 28 + 8 pages crosses the end (32)
    w = k.mmap(f, BASE + PMD, 8, pgoff=28)
    assert k.fault_around_window(w, 0) == range(0, 4)


@pytest.mark.parametrize(
    ("nbytes", "pages"),
    [(65536, 16), (4096, 1), (0, 1), (12288, 2), (PMD, 512)],
)
def test_fault_around_bytes_rounds_down_to_a_power_of_two(nbytes: int, pages: int) -> None:
    assert Kernel(fault_around_bytes=nbytes).fault_around_pages == pages


def test_fault_around_bytes_beyond_one_table_is_refused() -> None:
    with pytest.raises(ValueError, match="fault_around_bytes"):
        Kernel(fault_around_bytes=PMD + PAGE_SIZE)


def test_one_page_window_turns_fault_around_off() -> None:
    k = Kernel("pre-patch", fault_around_bytes=4096)
    f = k.shmem_file(8, cached=range(8))
    v = k.mmap(f, BASE, 8)
    k.read(v, 3)
    assert k.mapped(v) == {3}


def _window_before_6_4(start: int, pages: int, pgoff: int, index: int, nr: int) -> range:
    """The pre-6.4 arithmetic of do_fault_around() (address mask, then min3 on file offsets)."""
    address = start + index * PAGE_SIZE
    mask = ~(nr * PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    first = max(address & mask, start)
    off = ((address - first) // PAGE_SIZE) & (PTRS_PER_PTE - 1)
    start_pgoff = pgoff + index - off
    end_pgoff = start_pgoff - ((first // PAGE_SIZE) & (PTRS_PER_PTE - 1)) + PTRS_PER_PTE - 1
    end_pgoff = min(end_pgoff, pages + pgoff - 1, start_pgoff + nr - 1)
    return range(start_pgoff - pgoff, end_pgoff - pgoff + 1)


@given(
    start_page=st.integers(0, 4 * PTRS_PER_PTE),
    pages=st.integers(1, 700),
    pgoff=st.integers(0, 50),
    data=st.data(),
    shift=st.integers(1, 9),
)
def test_window_matches_the_older_kernel_arithmetic(
    start_page: int, pages: int, pgoff: int, data: st.DataObject, shift: int
) -> None:
    nr = 1 << shift
    index = data.draw(st.integers(0, pages - 1))
    k = Kernel("pre-patch", fault_around_bytes=nr * PAGE_SIZE)
    f = k.shmem_file(pgoff + pages)  # i_size past the VMA: no i_size clipping here
    v = k.mmap(f, BASE + start_page * PAGE_SIZE, pages, pgoff=pgoff)
    window = k.fault_around_window(v, index)
    assert window == _window_before_6_4(v.start, pages, pgoff, index, nr)
    assert index in window

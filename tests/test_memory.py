"""Memory makers, and reading the page tables: pagemap and PAGEMAP_SCAN."""

from __future__ import annotations

import os

import pytest

from userfaultfd import Feature, Mode, PageCategory, ScanFlag, Userfaultfd, memory
from userfaultfd.memory import PageRegion

from ._target import PAGE, Channel, Target, pattern


def test_anonymous_mapping_is_writable_and_knows_its_address() -> None:
    with memory.anonymous(4 * PAGE) as m:
        assert m.address % PAGE == 0 and m.length == 4 * PAGE and m.fd is None
        assert memory.resident(m.address, m.length) == [False] * 4
        m.view[PAGE : 2 * PAGE] = pattern(1)
        assert memory.resident(m.address, m.length) == [False, True, False, False]
    assert m.closed


def test_alias_shares_the_memfd_page_cache() -> None:
    with memory.memfd(2 * PAGE) as m, m.alias() as alias:
        assert alias.address != m.address
        alias.view[:PAGE] = pattern(5)
        assert bytes(m.view[:PAGE]) == pattern(5)


def test_private_memfd_mapping_keeps_writes_to_itself() -> None:
    with memory.memfd(PAGE, shared=False) as m, m.alias() as shared:
        shared.view[:4] = b"file"
        assert bytes(m.view[:4]) == b"file"  # reads come from the page cache
        m.view[:4] = b"mine"
        assert bytes(shared.view[:4]) == b"file"  # the private write made a copy


def test_punch_hole_drops_memfd_pages() -> None:
    with memory.memfd(2 * PAGE) as m:
        m.view[:] = pattern(0, PAGE) + pattern(1, PAGE)
        m.punch_hole(0, PAGE)
        assert bytes(m.view[:PAGE]) == bytes(PAGE) and bytes(m.view[PAGE:]) == pattern(1)


def test_anonymous_mapping_has_no_alias_or_hole() -> None:
    with memory.anonymous(PAGE) as m:
        with pytest.raises(ValueError, match="memfd-backed"):
            m.alias()
        with pytest.raises(ValueError, match="memfd-backed"):
            m.punch_hole(0, PAGE)


def test_numpy_view_sees_the_bytes_and_pins_the_mapping() -> None:
    m = memory.anonymous(PAGE)
    array = m.numpy("uint32")
    m.view[:8] = (7).to_bytes(4, "little") + (9).to_bytes(4, "little")
    assert array.shape == (PAGE // 4,) and list(array[:2]) == [7, 9]
    with pytest.raises(BufferError):
        m.close()
    del array
    m.close()
    assert m.closed


def test_lengths_must_be_page_multiples() -> None:
    with pytest.raises(ValueError, match="positive multiple of 4096"):
        memory.anonymous(100)
    with pytest.raises(ValueError, match="positive multiple"):
        memory.memfd(0)


def test_huge_pages_reserves_and_restores(hugepages: int, huge_page: int) -> None:
    assert hugepages >= 8
    with memory.hugetlb(2 * huge_page) as m:
        m.view[:4] = b"huge"
        assert bytes(m.view[:4]) == b"huge"


def test_huge_pages_pool_is_restored_after_the_block() -> None:
    if os.geteuid() != 0:
        pytest.skip("changing vm.nr_hugepages needs root")
    with open("/proc/sys/vm/nr_hugepages") as f:
        before = int(f.read())
    with memory.huge_pages(before + 3), open("/proc/sys/vm/nr_hugepages") as f:
        assert int(f.read()) >= before + 3
    with open("/proc/sys/vm/nr_hugepages") as f:
        assert int(f.read()) == before


def test_pagemap_scan_reports_present_runs() -> None:
    with memory.anonymous(6 * PAGE) as m:
        for page in (0, 1, 3, 4):
            m.view[page * PAGE] = 1
        result = memory.pagemap_scan(
            m.address,
            m.length,
            category_mask=PageCategory.PRESENT,
            return_mask=PageCategory.PRESENT,
        )
        assert result.regions == (
            PageRegion(m.address, m.address + 2 * PAGE, PageCategory.PRESENT),
            PageRegion(m.address + 3 * PAGE, m.address + 5 * PAGE, PageCategory.PRESENT),
        )
        assert result.walk_end == m.address + m.length


def test_pagemap_scan_continues_when_the_region_vector_fills() -> None:
    with memory.anonymous(8 * PAGE) as m:
        for page in range(0, 8, 2):
            m.view[page * PAGE] = 1
        result = memory.pagemap_scan(
            m.address, m.length, category_mask=PageCategory.PRESENT,
            return_mask=PageCategory.PRESENT, max_regions=1,
        )  # fmt: skip
        assert [r.start for r in result.regions] == [m.address + p * PAGE for p in (0, 2, 4, 6)]


def test_wp_async_dirty_pages_are_found_and_reprotected() -> None:
    """WP_ASYNC: writes never block; PAGEMAP_SCAN finds them and write-protects them again."""

    def body(channel: Channel) -> None:
        m = memory.anonymous(6 * PAGE)
        uffd = Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP)
        uffd.register(m.address, m.length, Mode.WP)
        uffd.writeprotect(m.address, m.length)
        m.view[PAGE] = 1
        m.view[2 * PAGE] = 2
        m.view[5 * PAGE] = 3

        def written() -> list[tuple[int, int]]:
            result = memory.pagemap_scan(
                m.address, m.length, category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN,
                flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
            )  # fmt: skip
            return [
                ((r.start - m.address) // PAGE, (r.end - m.address) // PAGE) for r in result.regions
            ]

        first = written()
        second = written()
        m.view[4 * PAGE] = 4
        channel.send((first, second, written()))

    with Target(body) as target:
        (first, second, third), _ = target.recv()
        assert first == [(1, 3), (5, 6)]
        assert second == []
        assert third == [(4, 5)]
        assert target.exit_code() == 0

"""Each kernel rule on its own, through the direct API (no explorer)."""

from __future__ import annotations

import pytest

from userfaultfd._flags import Mode
from userfaultfd.model import (
    PAGE_SIZE,
    Kernel,
    Marker,
    Present,
    Punch,
    Read,
    Serve,
    Vma,
    WouldBlock,
    Write,
)
from userfaultfd.model._state import Pc

BASE = 0x1000_0000


def _cached(k: Kernel, file: int, index: int) -> int:
    """The frame in the page cache at file page ``index`` (the test needs one there)."""
    fid = k.world.cached(file, index)
    assert fid is not None, f"file page {index} of file {file} is not in the page cache"
    return fid


def _wp_page(preset: str, **kw: int) -> tuple[Kernel, Vma]:
    """Four cached pages registered WP; page 1 written (mapped alone) and write-protected."""
    k = Kernel(preset, **kw)
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.WP)
    k.write(v, 1, "v1")
    k.writeprotect(v, 1)
    return k, v


# -- filemap_map_pages checks ----------------------------------------------------------------------
def test_fault_around_skips_locked_pages() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(4, cached=range(4), locked=[3])
    v = k.mmap(f, BASE, 4)
    k.read(v, 0)
    assert k.mapped(v) == {0, 1, 2}


def test_fault_around_skips_pages_not_uptodate() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(4, cached=range(4), not_uptodate=[2])
    v = k.mmap(f, BASE, 4)
    k.read(v, 0)
    assert k.mapped(v) == {0, 1, 3}


def test_fault_around_maps_only_cached_pages_read_only() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(4, cached=[0, 2])
    v = k.mmap(f, BASE, 4)
    k.read(v, 0)
    assert k.mapped(v) == {0, 2}
    assert k.pte(v, 2) == Present(_cached(k, f.id, 2), writable=False, uffd_wp=False)


def test_a_fault_on_a_locked_page_waits_for_the_lock() -> None:
    k = Kernel("pre-patch", fault_around_bytes=PAGE_SIZE)
    f = k.shmem_file(4, cached=range(4), locked=[1])
    v = k.mmap(f, BASE, 4)
    with pytest.raises(WouldBlock, match="page lock"):
        k.read(v, 1)


def test_a_fault_on_an_absent_page_allocates_a_zero_page() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4)
    v = k.mmap(f, BASE, 4)
    assert k.read(v, 2) == "0"
    frame = k.page(f, 2)
    assert frame is not None and frame.origin == "fault" and frame.locked is None
    assert k.mapped(v) == {2}


# -- userfault dispatch ----------------------------------------------------------------------------
def test_missing_fires_only_when_the_page_is_absent_from_the_cache() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(64, cached=range(32))
    v = k.mmap(f, BASE, 64, register=Mode.MISSING)
    with pytest.raises(WouldBlock) as info:
        k.read(v, 40)
    assert info.value.mode == Mode.MISSING
    # cached: no message, and upstream keeps fault-around for MISSING (the live 6.18 fact)
    assert k.read(v, 20) == "p20"
    assert k.mapped(v) == set(range(16, 32))


def test_wp_registration_maps_only_the_faulted_page_upstream() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(64, cached=range(64))
    v = k.mmap(f, BASE, 64, register=Mode.WP)
    k.read(v, 20)
    assert k.mapped(v) == {20}


def test_minor_fires_when_the_page_is_cached_and_not_when_absent() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4, cached=[0])
    v = k.mmap(f, BASE, 4, register=Mode.MINOR)
    with pytest.raises(WouldBlock) as info:
        k.read(v, 0)
    assert info.value.mode == Mode.MINOR
    assert k.mapped(v) == set()
    assert k.read(v, 1) == "0"  # absent and not MISSING: shmem allocates


def test_pre_patch_fault_around_maps_a_minor_page_with_no_message() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.MINOR)
    assert k.read(v, 0) == "p0"
    assert k.mapped(v) == {0, 1, 2, 3}
    assert k.world.queue == ()


def test_minor_message_resolved_by_update_and_continue() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.MINOR)
    k.spawn("reader", Read(v.id, 3))
    k.spawn("server", Serve())
    with pytest.raises(WouldBlock, match="MINOR userfault"):
        k.run("reader")
    steps = [k.step("server").function for _ in range(3)]
    assert steps == ["read(uffd)", "server", "UFFDIO_CONTINUE"]
    k.run("reader")
    assert k.world.thread("reader").value == "u3"
    assert k.mapped(v) == {3}


def test_missing_message_resolved_by_copy() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4)
    v = k.mmap(f, BASE, 4, register=Mode.MISSING)
    k.spawn("reader", Read(v.id, 2))
    k.spawn("server", Serve())
    with pytest.raises(WouldBlock, match="MISSING userfault"):
        k.run("reader")
    assert [k.step("server").function for _ in range(2)] == ["read(uffd)", "UFFDIO_COPY"]
    k.run("reader")
    assert k.world.thread("reader").value == "s2"
    frame = k.page(f, 2)
    assert frame is not None and frame.origin == "copy"


# -- write protection ------------------------------------------------------------------------------
def test_write_to_a_protected_pte_is_a_wp_userfault() -> None:
    k, v = _wp_page("pre-patch")
    with pytest.raises(WouldBlock) as info:
        k.write(v, 1, "x")
    assert info.value.mode == Mode.WP
    assert k.read(v, 1) == "v1"


def test_write_to_a_marker_installs_read_only_uffd_wp_then_wp_userfault() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.WP)
    k.writeprotect(v, 2)  # a none PTE of a file mapping: protected with a marker
    assert k.pte(v, 2) == Marker()
    with pytest.raises(WouldBlock) as info:
        k.write(v, 2, "x")
    assert info.value.mode == Mode.WP
    pte = k.pte(v, 2)
    assert isinstance(pte, Present) and pte.uffd_wp and not pte.writable


def test_without_markers_a_none_pte_cannot_be_protected() -> None:
    k = Kernel("as-posted")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.WP)
    k.writeprotect(v, 2)
    assert k.pte(v, 2) is None
    k.write(v, 2, "x")  # no message at all
    assert k.read(v, 2) == "x"


def test_read_only_pte_without_uffd_wp_is_reused_on_write() -> None:
    k = Kernel("pre-patch")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.WP)
    k.read(v, 0)  # fault-around maps 0..3 read-only, no uffd-wp
    fid = _cached(k, f.id, 3)
    k.write(v, 3, "x")
    assert k.pte(v, 3) == Present(fid, writable=True, uffd_wp=False)
    assert k.world.frame(fid).data == "x"


def test_private_write_copies_and_leaves_the_cache_alone() -> None:
    k = Kernel("upstream")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, shared=False)
    k.write(v, 1, "x")
    frame = k.page(f, 1)
    assert frame is not None and frame.data == "p1"
    assert k.read(v, 1) == "x"


# -- the two-step hole punch -----------------------------------------------------------------------
def _punch_started(preset: str, **kw: int) -> tuple[Kernel, Vma]:
    k, v = _wp_page(preset, **kw)
    k.spawn("punch", Punch(v.file, 1, 1))
    assert k.step("punch").function == "shmem_fallocate"
    assert k.step("punch").function == "unmap_mapping_range"
    return k, v


def test_pre_unmap_without_markers_loses_uffd_wp() -> None:
    k, v = _punch_started("pre-patch")
    assert k.pte(v, 1) is None


def test_pre_unmap_with_markers_leaves_a_marker_that_the_punch_keeps() -> None:
    # As Linux 6.18 does (uffd check's race sees it): truncate_cleanup_folio() unmaps the folio
    # only if it is still mapped, and the pre-unmap already unmapped it, so the marker stays.
    k, v = _punch_started("markers-only")
    assert k.pte(v, 1) == Marker()
    k.run("punch")
    assert k.pte(v, 1) == Marker()
    assert k.page(k.files[v.file], 1) is None


def test_truncate_drops_the_marker_when_the_folio_was_mapped_again() -> None:
    k = Kernel("markers-only")
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, BASE, 4, register=Mode.WP)
    other = k.mmap(f, BASE + 0x10_0000, 4)  # a second, unregistered mapping of the file
    k.write(v, 1, "v1")
    k.writeprotect(v, 1)
    k.spawn("punch", Punch(f.id, 1, 1))
    assert [k.step("punch").function for _ in range(3)] == [
        "shmem_fallocate", "unmap_mapping_range", "unmap_mapping_range",
    ]  # fmt: skip
    doomed = _cached(k, f.id, 1)
    k.read(other, 2)  # fault-around maps the doomed folio into the other mapping's none PTE
    assert k.pte(other, 1) == Present(doomed, writable=False, uffd_wp=False)
    k.run("punch")
    assert k.pte(v, 1) is None and k.pte(other, 1) is None  # unmap_mapping_folio: both


def test_a_fault_in_the_hole_waits_for_the_punch() -> None:
    k, v = _punch_started("pre-patch", fault_around_bytes=PAGE_SIZE)
    with pytest.raises(WouldBlock, match="shmem_falloc_wait"):
        k.read(v, 1)
    with pytest.raises(WouldBlock, match="shmem_falloc_wait"):
        k.write(v, 1, "x")


def test_fault_around_maps_the_page_being_punched() -> None:
    k, v = _punch_started("pre-patch")
    doomed = _cached(k, v.file, 1)
    k.read(v, 2)
    assert k.pte(v, 1) == Present(doomed, writable=False, uffd_wp=False)
    k.write(v, 1, "lost")  # no message: the uffd-wp bit went with the pre-unmap
    assert k.world.frame(doomed).data == "lost"
    k.run("punch")
    assert k.pte(v, 1) is None and k.page(k.files[v.file], 1) is None
    assert k.read(v, 1) == "0"  # the hole reads back as zeroes: the write is gone


def test_fault_around_does_not_map_over_a_marker() -> None:
    k, v = _punch_started("markers-only")
    k.read(v, 2)
    assert k.mapped(v) == {0, 2, 3}
    assert k.pte(v, 1) == Marker()


def test_sleepers_wake_when_the_punch_ends_and_fault_on_the_kept_marker() -> None:
    k, v = _punch_started("upstream")
    k.spawn("writer", Write(v.id, 1, "x"))
    k.step("writer")  # fault on the marker
    k.step("writer")  # shmem_fault: in the hole -> sleeps
    asleep = k.world.thread("writer")
    assert asleep.pc == Pc.FALLOC_WAIT, asleep
    k.run("punch")
    woken = k.world.thread("writer")
    assert woken.pc == Pc.ACCESS, f"the punch's end left the writer at {woken.pc}"
    # The marker outlived the punch: the retried write is reported to the server.
    with pytest.raises(WouldBlock, match="WP userfault on page 1"):
        k.run("writer")
    fresh = _cached(k, v.file, 1)  # a new zero page, mapped read-only with uffd-wp
    assert k.pte(v, 1) == Present(fresh, writable=False, uffd_wp=True)


def test_mmap_checks_its_arguments() -> None:
    k = Kernel()
    f = k.shmem_file(4)
    with pytest.raises(ValueError, match="aligned"):
        k.mmap(f, BASE + 1, 4)
    k.mmap(f, BASE, 4)
    with pytest.raises(ValueError, match="overlaps"):
        k.mmap(f, BASE + PAGE_SIZE, 4)
    k.mmap(f, BASE, 4, mm=1)  # another address space

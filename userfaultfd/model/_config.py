"""What the rules read that never changes while threads run: the frozen configuration.

A :class:`Config` is the kernel's fixed setup at one moment of building: the shmem files, the
VMAs, each thread's program, the preset and the fault-around window. The rules
(:mod:`._fault`, :mod:`._punch`, :mod:`._server`), the reduction's futures (:mod:`._future`)
and the scenarios' invariants read it; none of them can change it. :class:`._kernel.Kernel`
builds it (each ``shmem_file``, ``mmap`` and ``spawn`` makes a new one) and the explorer takes
the last one, so exploring needs no Kernel at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import final

from ._ops import File, Op, Vma
from ._presets import Preset
from ._state import PAGE_SIZE, PTRS_PER_PTE

__all__ = ["Config", "fault_around_pages"]


def fault_around_pages(nbytes: int) -> int:
    """The window in pages for fault_around_bytes ``nbytes``, as fault_around_bytes_set() sets it:
    more than one page table is refused; rounded down to a power of two; anything under two
    pages leaves one page, which turns fault-around off."""
    if nbytes < 0 or nbytes // PAGE_SIZE > PTRS_PER_PTE:
        raise ValueError(
            f"fault_around_bytes must be between 0 and {PTRS_PER_PTE * PAGE_SIZE}, got {nbytes}"
        )
    pow2 = 1 << (nbytes.bit_length() - 1) if nbytes else 0
    return max(pow2 // PAGE_SIZE, 1)


def _no_programs() -> Mapping[str, tuple[Op, ...]]:
    return MappingProxyType({})


@final
@dataclass(frozen=True, slots=True, eq=False)
class Config:
    """The kernel's fixed setup: files and VMAs (indexed by their ids), each thread's program
    (in spawn order), the preset, and the fault-around window in pages."""

    preset: Preset
    fault_around_pages: int
    files: tuple[File, ...] = ()
    vmas: tuple[Vma, ...] = ()
    programs: Mapping[str, tuple[Op, ...]] = field(default_factory=_no_programs)

    def with_file(self, file: File) -> Config:
        return replace(self, files=(*self.files, file))

    def with_vma(self, vma: Vma) -> Config:
        return replace(self, vmas=(*self.vmas, vma))

    def with_programs(self, programs: Mapping[str, tuple[Op, ...]]) -> Config:
        """This configuration with ``programs`` (copied: the Config's own never changes)."""
        return replace(self, programs=MappingProxyType(dict(programs)))

    def fault_around_window(self, vma: Vma, index: int) -> range:
        """VMA page indexes do_fault_around() would try for a fault on page ``index``.

        do_fault_around() (6.x) in PTE offsets: the start is the fault's PTE rounded down to
        fault_around_pages, but not before the VMA; the end is nr_pages on, but not past the
        page table (PTRS_PER_PTE) nor the VMA. map_pages gets file offsets, and
        filemap_map_pages() clips the end to the last page inside i_size.
        """
        nr = self.fault_around_pages
        pte_off = (vma.start // PAGE_SIZE + index) % PTRS_PER_PTE
        vma_off = index
        from_pte = max(pte_off - pte_off % nr, pte_off - min(pte_off, vma_off))
        to_pte = min(from_pte + nr, PTRS_PER_PTE, pte_off + vma.pages - vma_off) - 1
        pgoff = vma.pgoff + index
        start_pgoff = pgoff + from_pte - pte_off
        end_pgoff = min(pgoff + to_pte - pte_off, self.files[vma.file].pages - 1)
        return range(start_pgoff - vma.pgoff, end_pgoff - vma.pgoff + 1)

    def should_fault_around(self, vma: Vma) -> bool:
        # should_fault_around(): shmem has ->map_pages; uffd_disable_fault_around() is the
        # preset's mode mask (the seed put its check at the top of do_fault_around(): same effect).
        if vma.register & self.preset.no_fault_around:
            return False
        return self.fault_around_pages > 1

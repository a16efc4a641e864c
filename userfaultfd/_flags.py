"""The flag sets of the userfaultfd ABI as IntFlags.

Each mirrors a table of include/uapi/linux/userfaultfd.h (Linux 6.8). IntFlag keeps bits this
library does not know, so a newer kernel's answer survives a round trip. Names drop the kernel's
``UFFD_`` / ``UFFDIO_`` prefixes.
"""

from __future__ import annotations

import enum

from . import _abi

__all__ = ["FEATURE_SINCE", "FaultFlag", "Feature", "Ioctl", "Mode", "PageCategory", "ScanFlag"]


class Feature(enum.IntFlag, boundary=enum.KEEP):
    """UFFD_FEATURE_* bits: what UFFDIO_API offers and what a userfaultfd enables."""

    #: Write-protect faults are reported (UFFD_PAGEFAULT_FLAG_WP); anonymous memory.
    PAGEFAULT_FLAG_WP = 1 << 0
    #: fork() of a process with registered memory sends a Fork event carrying a new uffd.
    EVENT_FORK = 1 << 1
    #: mremap() of registered memory sends a Remap event.
    EVENT_REMAP = 1 << 2
    #: madvise(DONTNEED/REMOVE) and hole punching send a Remove event.
    EVENT_REMOVE = 1 << 3
    #: MISSING mode works on hugetlbfs.
    MISSING_HUGETLBFS = 1 << 4
    #: MISSING mode works on shmem / memfd.
    MISSING_SHMEM = 1 << 5
    #: munmap() of registered memory sends an Unmap event.
    EVENT_UNMAP = 1 << 6
    #: Faults raise SIGBUS in the faulting thread instead of queueing an event.
    SIGBUS = 1 << 7
    #: PageFault events carry the faulting thread's id.
    THREAD_ID = 1 << 8
    #: MINOR mode works on hugetlbfs.
    MINOR_HUGETLBFS = 1 << 9
    #: MINOR mode works on shmem / memfd.
    MINOR_SHMEM = 1 << 10
    #: PageFault addresses keep their offset within the page.
    EXACT_ADDRESS = 1 << 11
    #: WP mode works on shmem and hugetlbfs (PTE markers keep the protection).
    WP_HUGETLBFS_SHMEM = 1 << 12
    #: Write-protecting a range also protects pages never touched yet.
    WP_UNPOPULATED = 1 << 13
    #: UFFDIO_POISON is available.
    POISON = 1 << 14
    #: WP faults resolve themselves in the kernel; PAGEMAP_SCAN reports what was written.
    WP_ASYNC = 1 << 15
    #: UFFDIO_MOVE is available (anonymous memory).
    MOVE = 1 << 16


#: The kernel release that introduced each feature, for error messages and ``uffd features``.
FEATURE_SINCE: dict[Feature, str] = {
    Feature.PAGEFAULT_FLAG_WP: "5.10",
    Feature.EVENT_FORK: "4.11",
    Feature.EVENT_REMAP: "4.11",
    Feature.EVENT_REMOVE: "4.11",
    Feature.MISSING_HUGETLBFS: "4.11",
    Feature.MISSING_SHMEM: "4.11",
    Feature.EVENT_UNMAP: "4.11",
    Feature.SIGBUS: "4.14",
    Feature.THREAD_ID: "4.14",
    Feature.MINOR_HUGETLBFS: "5.13",
    Feature.MINOR_SHMEM: "5.14",
    Feature.EXACT_ADDRESS: "5.18",
    Feature.WP_HUGETLBFS_SHMEM: "5.19",
    Feature.WP_UNPOPULATED: "6.4",
    Feature.POISON: "6.6",
    Feature.WP_ASYNC: "6.7",
    Feature.MOVE: "6.8",
}


class Mode(enum.IntFlag, boundary=enum.KEEP):
    """UFFDIO_REGISTER_MODE_*: which faults of a range reach the handler."""

    #: A page absent from the page table (and, for shmem, from the page cache).
    MISSING = _abi.UFFDIO_REGISTER_MODE_MISSING
    #: A write to a write-protected page.
    WP = _abi.UFFDIO_REGISTER_MODE_WP
    #: A page present in the page cache but not yet mapped here (shmem, hugetlbfs).
    MINOR = _abi.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag, boundary=enum.KEEP):
    """The ioctl bitmask UFFDIO_API and UFFDIO_REGISTER return: bit (1 << nr) per ioctl."""

    #: UFFDIO_REGISTER.
    REGISTER = 1 << _abi.NR_REGISTER
    #: UFFDIO_UNREGISTER.
    UNREGISTER = 1 << _abi.NR_UNREGISTER
    #: UFFDIO_WAKE.
    WAKE = 1 << _abi.NR_WAKE
    #: UFFDIO_COPY.
    COPY = 1 << _abi.NR_COPY
    #: UFFDIO_ZEROPAGE.
    ZEROPAGE = 1 << _abi.NR_ZEROPAGE
    #: UFFDIO_MOVE.
    MOVE = 1 << _abi.NR_MOVE
    #: UFFDIO_WRITEPROTECT.
    WRITEPROTECT = 1 << _abi.NR_WRITEPROTECT
    #: UFFDIO_CONTINUE.
    CONTINUE = 1 << _abi.NR_CONTINUE
    #: UFFDIO_POISON.
    POISON = 1 << _abi.NR_POISON
    #: UFFDIO_API.
    API = 1 << _abi.NR_API


class FaultFlag(enum.IntFlag, boundary=enum.KEEP):
    """UFFD_PAGEFAULT_FLAG_*: why a PageFault event was raised."""

    #: The access was a write.
    WRITE = _abi.UFFD_PAGEFAULT_FLAG_WRITE
    #: The page is write-protected (WP mode).
    WP = _abi.UFFD_PAGEFAULT_FLAG_WP
    #: The page is in the page cache but not mapped (MINOR mode).
    MINOR = _abi.UFFD_PAGEFAULT_FLAG_MINOR


class PageCategory(enum.IntFlag, boundary=enum.KEEP):
    """PAGE_IS_* categories of PAGEMAP_SCAN (include/uapi/linux/fs.h)."""

    #: Write-protect is armed on the page (uffd-wp async: not written since protection).
    WPALLOWED = _abi.PAGE_IS_WPALLOWED
    #: Written since it was write-protected (uffd-wp async).
    WRITTEN = _abi.PAGE_IS_WRITTEN
    #: File-backed or shared.
    FILE = _abi.PAGE_IS_FILE
    #: Present in RAM.
    PRESENT = _abi.PAGE_IS_PRESENT
    #: Swapped out.
    SWAPPED = _abi.PAGE_IS_SWAPPED
    #: Mapped to the shared zero page.
    PFNZERO = _abi.PAGE_IS_PFNZERO
    #: Part of a huge page (THP or hugetlb).
    HUGE = _abi.PAGE_IS_HUGE
    #: Soft-dirty bit set.
    SOFT_DIRTY = _abi.PAGE_IS_SOFT_DIRTY


class ScanFlag(enum.IntFlag, boundary=enum.KEEP):
    """PM_SCAN_* flags of PAGEMAP_SCAN."""

    #: Write-protect the matching pages in the same walk (uffd-wp async).
    WP_MATCHING = _abi.PM_SCAN_WP_MATCHING
    #: Fail with EPERM unless the whole range is registered WP with WP_ASYNC.
    CHECK_WPASYNC = _abi.PM_SCAN_CHECK_WPASYNC

"""What threads do and what a step says: the model's op records, step labels and direct-call errors.

A thread's program is a tuple of ops (:data:`Op`); the kernel rules (:mod:`._kernel`) advance one
op a step at a time and describe each step with a :class:`Label`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from .._flags import Mode as _Mode

__all__ = [
    "CopyPages",
    "File",
    "Label",
    "Op",
    "Protect",
    "Punch",
    "Read",
    "Serve",
    "SigBusError",
    "Vma",
    "WouldBlock",
    "Write",
    "WriteBack",
    "WriteProtect",
]


@final
class WouldBlock(Exception):  # noqa: N818 (the name is the public API)
    """A direct call would sleep: on a userfault, a hole punch in progress, or a page lock."""

    def __init__(self, reason: str, mode: _Mode | None = None) -> None:
        super().__init__(reason)
        #: The userfault mode if a userfault would block, else None.
        self.mode = mode


@final
class SigBusError(Exception):
    """An access beyond the end of the file (shmem_fault returns VM_FAULT_SIGBUS)."""


@final
@dataclass(frozen=True, slots=True)
class File:
    """A shmem file; ``pages`` is i_size in pages (fixed: the model never truncates i_size)."""

    id: int
    pages: int


@final
@dataclass(frozen=True, slots=True)
class Vma:
    """A mapping of ``pages`` pages of ``file`` from page ``pgoff``, at ``start`` (bytes)."""

    id: int
    mm: int
    start: int
    pages: int
    file: int
    pgoff: int
    shared: bool
    register: _Mode


@final
@dataclass(frozen=True, slots=True)
class Read:
    """Load from page ``index`` of a VMA."""

    vma: int
    index: int


@final
@dataclass(frozen=True, slots=True)
class Write:
    """Store ``data`` (the whole page, for the model) to page ``index`` of a VMA."""

    vma: int
    index: int
    data: str


@final
@dataclass(frozen=True, slots=True)
class Punch:
    """fallocate(FALLOC_FL_PUNCH_HOLE) of ``pages`` file pages from ``start``."""

    file: int
    start: int
    pages: int


@final
@dataclass(frozen=True, slots=True)
class Serve:
    """The userfaultfd server: read a message, resolve it, wake; forever.

    With ``snapshot``, it is the live snapshot's fault thread: on a WP message it saves the
    page to the snapshot unless the copier did already, then lifts the protection. With
    ``prefetch``, a MISSING message is the runtime handler's fill path: UFFDIO_COPY of the
    faulting page first (EEXIST: someone else filled it), then of the ``prefetch`` pages after
    it, one page a step as the kernel's copy loop goes; the copy stops at a page already there
    and the handler resumes after it (the runtime's EAGAIN with ``done``). With ``pager``, it is
    the out-of-core pager's handler: a MISSING message is filled from the store with
    UFFDIO_COPY(MODE_WP) (the page arrives clean and write-protected), a WP message marks the
    page dirty and then lifts the protection (UFFDIO_WRITEPROTECT(0)).
    """

    snapshot: bool = False
    prefetch: int = 0
    pager: bool = False


@final
@dataclass(frozen=True, slots=True)
class Protect:
    """The live snapshot's protect instant: UFFDIO_WRITEPROTECT of the whole VMA, one step."""

    vma: int


@final
@dataclass(frozen=True, slots=True)
class CopyPages:
    """The live snapshot's background copy: page by page in order, each saved and then
    unprotected, skipping pages the fault thread saved meanwhile."""

    vma: int


@final
@dataclass(frozen=True, slots=True)
class WriteProtect:
    """UFFDIO_WRITEPROTECT of page ``index`` of a VMA, one step (the pager's eviction begins
    with it): a present PTE gets uffd-wp; a none PTE a marker, only with PTE markers."""

    vma: int
    index: int


@final
@dataclass(frozen=True, slots=True)
class WriteBack:
    """The pager writes page ``index`` of a VMA back to its store if it is dirty, reading it
    through its own mapping of the file (the page cache's frame), and marks it clean."""

    vma: int
    index: int


#: One op of a thread's program.
Op = Read | Write | Punch | Serve | Protect | CopyPages | WriteProtect | WriteBack


@final
@dataclass(frozen=True, slots=True)
class Label:
    """What one step did: the kernel function it mirrors and the change, in words."""

    function: str
    change: str

"""The kernel rules: shmem faults, fault-around, hole punching and userfaultfd, step by step.

Design note
-----------
Each thread runs a program of ops (Read, Write, Punch, Serve). An op advances one *step* at a
time, and a step is one critical section of the kernel code it mirrors: whatever the kernel does
under one lock (or one RCU walk) happens in one step, and another thread can run between two
steps exactly where the kernel drops one lock and takes the next. The steps:

=================  =========================================================  ==================
step (pc)          mirrors                                                    lock granularity
=================  =========================================================  ==================
access             the CPU's load/store; on failure handle_pte_fault()'s      hardware walk
                   dispatch (do_read_fault, do_shared_fault, do_wp_page,
                   handle_pte_marker -> do_pte_missing)
fault_around       do_fault_around() -> filemap_map_pages(): the window       PTE lock + RCU,
                   arithmetic of 6.x mm/memory.c, end clipped to i_size;      folio_trylock per
                   maps pages cached, uptodate, unlocked into pte_none() PTEs page
shmem_fault        shmem_fault()'s inode->i_private check; a fault inside a   inode->i_lock
                   hole being punched sleeps in shmem_falloc_wait()
get_folio          shmem_get_folio_gfp(): MINOR userfault if cached, MISSING  RCU (xarray);
                   if absent, else allocate a zero page (locked) or look up   xa_lock to add
lock_page          folio_lock(), then the folio->mapping recheck ("repeat")   page lock
finish_fault       finish_fault() + folio_unlock(): pte_same() check, install PTE lock
                   (a marker's uffd-wp is kept), COW for private writes
wp_page            do_wp_page(): WP userfault if the PTE carries uffd-wp,     PTE lock
                   else wp_page_reuse() (shared) or wp_page_copy() (private)
publish/unmap      shmem_fallocate(PUNCH_HOLE): inode->i_private = range;     i_lock; PTE lock
                   unmap_mapping_range(even_cows=0) one VMA per step; a       per VMA
                   protected PTE becomes a marker if markers are on
truncate/remove    shmem_truncate_range(): lock each page of the hole, then   page lock; PTE
                   unmap_mapping_folio (ZAP_FLAG_DROP_MARKER) if the folio    lock + xa_lock
                   is still mapped, filemap_remove_folio, unlock
end                clear inode->i_private, wake shmem_falloc_wait sleepers    i_lock
server steps       read(2) of the uffd; UFFDIO_COPY (shmem_mfill_atomic_pte); one ioctl each
                   update + UFFDIO_CONTINUE; save + UFFDIO_WRITEPROTECT(0)
=================  =========================================================  ==================

The live snapshot (the runtime's protocol, as threads): ``Protect`` is one step, the protect
instant over the whole range; ``CopyPages`` takes two steps a page (save it unless saved, then
UFFDIO_WRITEPROTECT(0)); ``Serve(snapshot=True)`` saves a WP-faulting page unless the copier did,
then unprotects it.

For the explorer's persistent sets, ``future()`` says what a thread may still touch, from its
remaining program (and, from the World, only who is asleep and what is queued), and
``enablers()`` who could let a thread move that cannot.

A userfault queues a message and puts the thread to sleep; the ioctl that resolves it wakes it
and the access starts again from the top, as the kernel's VM_FAULT_RETRY does. Simplifications
(each noted where it is made): one 4 KiB page per folio, no swap, no THP, the whole PMD is one
page table; truncation locks pages in index order (the kernel's trylock pass then blocking pass
end the same way); EVENT_REMOVE is not modelled (fallocate() does not send it).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace

from .._flags import Mode as _Mode
from .presets import Preset as _Preset
from .presets import get_preset as _get_preset
from .state import MARKER as _MARKER
from .state import PAGE_SIZE as _PAGE_SIZE
from .state import PTRS_PER_PTE as _PTRS_PER_PTE
from .state import Event as _Event
from .state import Frame as _Frame
from .state import Marker as _Marker
from .state import Present as _Present
from .state import (
    Pte,
)
from .state import ThreadState as _ThreadState
from .state import World as _World

__all__ = [
    "CopyPages",
    "File",
    "Kernel",
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
]

# Program counters a thread sleeps at: only another thread's step (a wake) moves it on.
_ASLEEP = frozenset({"userfault", "falloc_wait"})


class WouldBlock(Exception):  # noqa: N818 (the name is the public API)
    """A direct call would sleep: on a userfault, a hole punch in progress, or a page lock."""

    def __init__(self, reason: str, mode: _Mode | None = None) -> None:
        super().__init__(reason)
        #: The userfault mode if a userfault would block, else None.
        self.mode = mode


class SigBusError(Exception):
    """An access beyond the end of the file (shmem_fault returns VM_FAULT_SIGBUS)."""


@dataclass(frozen=True, slots=True)
class File:
    """A shmem file; ``pages`` is i_size in pages (fixed: the model never truncates i_size)."""

    id: int
    pages: int


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


@dataclass(frozen=True, slots=True)
class Read:
    """Load from page ``index`` of a VMA."""

    vma: int
    index: int


@dataclass(frozen=True, slots=True)
class Write:
    """Store ``data`` (the whole page, for the model) to page ``index`` of a VMA."""

    vma: int
    index: int
    data: str


@dataclass(frozen=True, slots=True)
class Punch:
    """fallocate(FALLOC_FL_PUNCH_HOLE) of ``pages`` file pages from ``start``."""

    file: int
    start: int
    pages: int


@dataclass(frozen=True, slots=True)
class Serve:
    """The userfaultfd server: read a message, resolve it, wake; forever.

    With ``snapshot``, it is the live snapshot's fault thread: on a WP message it saves the
    page to the snapshot unless the copier did already, then lifts the protection. With
    ``prefetch``, a MISSING message is the runtime handler's fill path: UFFDIO_COPY of the
    faulting page first (EEXIST: someone else filled it), then of the ``prefetch`` pages after
    it, one page a step as the kernel's copy loop goes; the copy stops at a page already there
    and the handler resumes after it (the runtime's EAGAIN with ``done``).
    """

    snapshot: bool = False
    prefetch: int = 0


@dataclass(frozen=True, slots=True)
class Protect:
    """The live snapshot's protect instant: UFFDIO_WRITEPROTECT of the whole VMA, one step."""

    vma: int


@dataclass(frozen=True, slots=True)
class CopyPages:
    """The live snapshot's background copy: page by page in order, each saved and then
    unprotected, skipping pages the fault thread saved meanwhile."""

    vma: int


Op = Read | Write | Punch | Serve | Protect | CopyPages


@dataclass(frozen=True, slots=True)
class Label:
    """What one step did: the kernel function it mirrors and the change, in words."""

    function: str
    change: str


def _fault_around_pages(nbytes: int) -> int:
    # fault_around_bytes_set(): more than one page table is refused; rounded down to a power of
    # two; anything under two pages leaves one page, which turns fault-around off.
    if nbytes < 0 or nbytes // _PAGE_SIZE > _PTRS_PER_PTE:
        raise ValueError(
            f"fault_around_bytes must be between 0 and {_PTRS_PER_PTE * _PAGE_SIZE}, got {nbytes}"
        )
    pow2 = 1 << (nbytes.bit_length() - 1) if nbytes else 0
    return max(pow2 // _PAGE_SIZE, 1)


def _in_hole(w: _World, vma: Vma, index: int) -> bool:
    # For labels only: reads inode->i_private without noting it (the rule does not look).
    span = w.falloc.get(vma.file)
    return span is not None and span[0] <= vma.pgoff + index < span[1]


def _pages(indexes: Iterable[object]) -> str:
    out = ", ".join(str(i) for i in indexes)
    return out or "none"


class Kernel:
    """The model kernel: shmem files, address spaces, and the rules that move threads.

    The same rules serve direct calls (``read``, ``write``, ``punch_hole``: one thread run to
    completion) and the explorer (``advance``: one step of one thread from any World).
    """

    def __init__(self, preset: _Preset | str = "upstream", fault_around_bytes: int = 65536) -> None:
        self.preset = _get_preset(preset)
        self.fault_around_bytes = fault_around_bytes
        self.fault_around_pages = _fault_around_pages(fault_around_bytes)
        self.files: list[File] = []
        self.vmas: list[Vma] = []
        self.programs: dict[str, tuple[Op, ...]] = {}
        self.world = _World()

    # -- building the system ---------------------------------------------------------------------
    def shmem_file(
        self,
        pages: int,
        cached: Iterable[int] = (),
        *,
        locked: Iterable[int] = (),
        not_uptodate: Iterable[int] = (),
    ) -> File:
        """A shmem file of ``pages`` pages; ``cached`` pages are in the page cache, uptodate.

        ``locked`` and ``not_uptodate`` add cached pages in those states (as if another thread
        were reading or truncating them), to exercise filemap_map_pages()'s checks.
        """
        if pages < 0:
            raise ValueError(f"a file has zero or more pages, got {pages}")
        f = File(len(self.files), pages)
        self.files.append(f)
        w = self.world.clone()  # Worlds are values: never change one in place
        lock_set, stale = set(locked), set(not_uptodate)
        for i in sorted(set(cached) | lock_set | stale):
            if not 0 <= i < pages:
                raise ValueError(f"cached page {i} is outside the file's {pages} pages")
            owner = "setup" if i in lock_set else None
            fid = w.new_frame(_Frame(f"p{i}", owner, i not in stale, i, "setup"))
            w.cache[(f.id, i)] = fid
        self.world = w
        return f

    def mmap(
        self,
        file: File,
        address: int,
        pages: int,
        pgoff: int = 0,
        shared: bool = True,
        register: _Mode | None = None,
        *,
        mm: int = 0,
    ) -> Vma:
        """Map ``pages`` pages of ``file`` from page ``pgoff`` at ``address`` in address space
        ``mm``, registered with a userfaultfd in ``register`` mode (None: not registered)."""
        if address % _PAGE_SIZE or address < 0:
            raise ValueError(f"address {address:#x} is not page aligned")
        if pages <= 0 or pgoff < 0:
            raise ValueError(f"need pages > 0 and pgoff >= 0, got pages={pages} pgoff={pgoff}")
        end = address + pages * _PAGE_SIZE
        for v in self.vmas:
            if v.mm == mm and v.start < end and address < v.start + v.pages * _PAGE_SIZE:
                raise ValueError(f"[{address:#x}, {end:#x}) overlaps VMA {v.id} in mm {mm}")
        v = Vma(len(self.vmas), mm, address, pages, file.id, pgoff, shared, register or _Mode(0))
        self.vmas.append(v)
        return v

    def spawn(self, name: str, *ops: Op) -> None:
        """Add a thread that will run ``ops`` in order (it runs when stepped)."""
        if name in self.programs:
            raise ValueError(f"thread {name!r} exists")
        self.programs[name] = ops
        w = self.world.clone()
        w.threads[name] = _ThreadState()
        self.world = w

    @property
    def thread_names(self) -> tuple[str, ...]:
        return tuple(self.programs)

    # -- direct use: one thread, to completion -----------------------------------------------------
    def read(self, vma: Vma, index: int) -> str:
        """Load from page ``index`` of ``vma``; return the page's contents."""
        self._check_index(vma, index)
        state = self._direct(Read(vma.id, index))
        if state.pc == "sigbus":
            raise SigBusError(f"page {index} of VMA {vma.id} is beyond the end of the file")
        assert state.value is not None
        return state.value

    def write(self, vma: Vma, index: int, data: str) -> None:
        """Store ``data`` to page ``index`` of ``vma``."""
        self._check_index(vma, index)
        if self._direct(Write(vma.id, index, data)).pc == "sigbus":
            raise SigBusError(f"page {index} of VMA {vma.id} is beyond the end of the file")

    def punch_hole(self, file: File, start: int, pages: int) -> None:
        """fallocate(PUNCH_HOLE) of ``pages`` pages from file page ``start``."""
        self._direct(Punch(file.id, start, pages))

    def writeprotect(self, vma: Vma, index: int) -> None:
        """UFFDIO_WRITEPROTECT one page, as the server does; the server notes the frame."""
        w = self.world.clone()
        pte = w.pte(vma.id, index)
        if isinstance(pte, _Present):
            w.set_pte(vma.id, index, _Present(pte.frame, writable=False, uffd_wp=True))
            w.protected = {**w.protected, pte.frame: w.frames[pte.frame].data}
        elif pte is None and self.preset.pte_markers:
            # change_pte_range() protects a none PTE of a file mapping with a marker.
            w.set_pte(vma.id, index, _MARKER)
        self.world = w

    def mapped(self, vma: Vma) -> set[int]:
        """VMA page indexes with a present PTE."""
        return {
            i for (v, i), p in self.world.ptes.items() if v == vma.id and isinstance(p, _Present)
        }

    def pte(self, vma: Vma, index: int) -> Pte:
        return self.world.ptes.get((vma.id, index))

    def page(self, file: File, index: int) -> _Frame | None:
        """The frame in the page cache at file page ``index``, or None."""
        fid = self.world.cache.get((file.id, index))
        return None if fid is None else self.world.frames[fid]

    def step(self, name: str) -> Label:
        """Advance thread ``name`` by one step (raises WouldBlock if it cannot move)."""
        moved = self.advance(self.world, name)
        if moved is None:
            raise WouldBlock(self._why(self.world, name))
        self.world, label = moved
        return label

    def run(self, name: str) -> list[Label]:
        """Step thread ``name`` until its program ends (raises WouldBlock if it cannot move)."""
        labels = []
        while self.world.threads[name].op < len(self.programs[name]):
            labels.append(self.step(name))
        return labels

    def fault_around_window(self, vma: Vma, index: int) -> range:
        """VMA page indexes do_fault_around() would try for a fault on page ``index``.

        do_fault_around() (6.x) in PTE offsets: the start is the fault's PTE rounded down to
        fault_around_pages, but not before the VMA; the end is nr_pages on, but not past the
        page table (PTRS_PER_PTE) nor the VMA. map_pages gets file offsets, and
        filemap_map_pages() clips the end to the last page inside i_size.
        """
        nr = self.fault_around_pages
        pte_off = (vma.start // _PAGE_SIZE + index) % _PTRS_PER_PTE
        vma_off = index
        from_pte = max(pte_off - pte_off % nr, pte_off - min(pte_off, vma_off))
        to_pte = min(from_pte + nr, _PTRS_PER_PTE, pte_off + vma.pages - vma_off) - 1
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

    def _check_index(self, vma: Vma, index: int) -> None:
        if not 0 <= index < vma.pages:
            raise ValueError(f"page {index} is outside VMA {vma.id} ({vma.pages} pages)")

    def _direct(self, op: Op) -> _ThreadState:
        name = "_direct"
        self.spawn(name, op)
        try:
            while self.world.threads[name].op < 1:
                before = self.world
                moved = self.advance(before, name)
                if moved is None:
                    raise WouldBlock(self._why(before, name))
                after, _ = moved
                state = after.threads[name]
                if state.pc in _ASLEEP:
                    # Keep what happened before the sleep (fault-around), as the kernel does;
                    # drop the queued message with the thread that would have slept.
                    mode = after.queue[-1].mode if state.pc == "userfault" else None
                    raise WouldBlock(self._why(after, name), mode)
                self.world = after
            return self.world.threads[name]
        finally:
            del self.programs[name]
            w = self.world.clone()
            del w.threads[name]
            self.world = w

    def _why(self, world: _World, name: str) -> str:
        state = world.threads.get(name)
        if state is None or state.op >= len(self.programs[name]):
            return f"thread {name!r} has finished"
        if state.pc == "userfault":
            ev = next(e for e in reversed(world.queue) if e.thread == name)
            return f"{ev.mode.name} userfault on page {ev.index} of VMA {ev.vma}"
        if state.pc == "falloc_wait":
            return "a hole punch covers the page: shmem_falloc_wait() sleeps"
        op = self.programs[name][state.op]
        if isinstance(op, Punch) and state.pc == "access" and op.file in world.falloc:
            return "another hole punch of the file holds the inode lock"
        if state.pc in ("lock_page", "truncate", "continue"):
            return "waiting for a page lock"
        return f"thread {name!r} cannot move at {state.pc}"

    # -- the rules ---------------------------------------------------------------------------------
    def advance(self, world: _World, name: str) -> tuple[_World, Label] | None:
        """One step of thread ``name`` from ``world``: the new World and what changed, or None
        if the thread is asleep, blocked on a lock, or finished. ``world`` is left untouched; the
        new World's ``reads``/``writes`` hold the step's footprint."""
        state = world.threads[name]
        program = self.programs[name]
        if state.op >= len(program):
            return None
        w = world.clone()
        w.reads.add(("thread", name))
        w.writes.add(("thread", name))
        op = program[state.op]
        label: Label | None
        if isinstance(op, Read | Write):
            label = self._access(w, name, state, op)
        elif isinstance(op, Punch):
            label = self._punch(w, name, state, op)
        elif isinstance(op, Protect):
            label = self._protect(w, name, state, op)
        elif isinstance(op, CopyPages):
            label = self._copy_pages(w, name, state, op)
        else:
            label = self._serve(w, name, state, op)
        return None if label is None else (w, label)

    def finished(self, world: _World) -> bool:
        """Every thread but the server has run its program to the end."""
        return all(
            world.threads[n].op >= len(p)
            for n, p in self.programs.items()
            if not any(isinstance(op, Serve) for op in p)
        )

    @staticmethod
    def faults(world: _World) -> int:
        return sum(t.faults for t in world.threads.values())

    # -- what a thread may touch: for the explorer's persistent sets -----------------------------
    def abstract(self, world: _World, objects: Iterable[Hashable]) -> frozenset[Hashable]:
        """A footprint in the vocabulary of ``future``: a frame becomes its file page
        (``("page", index)``), since which frame a future step meets is not known yet."""
        out: set[Hashable] = set()
        for obj in objects:
            assert isinstance(obj, tuple)
            if obj[0] in ("frame", "data"):
                out.add(("page", world.frames[obj[1]].index))
            else:
                out.add(obj)
        return frozenset(out)

    def future(
        self, world: _World, name: str, frozen: frozenset[str]
    ) -> tuple[frozenset[Hashable], frozenset[Hashable]]:
        """(reads, writes) that thread ``name`` may touch in any number of its own steps from
        ``world``, while the threads in ``frozen`` stay where they are (in ``abstract``'s terms).

        It is built from the thread's remaining program, not from the World, except for what
        only the present can say: which threads are asleep (only those can be woken by someone
        else: an awake thread in ``frozen`` stays awake), the messages already queued, and who
        could still queue one. A thread asleep whose every waker is frozen takes no step at all.
        """
        ts = world.threads[name]
        program = self.programs[name]
        empty: frozenset[Hashable] = frozenset()
        stalled = self.enablers(world, name)
        if stalled is not None and stalled <= frozen:
            return empty, empty
        reads: set[Hashable] = set()
        writes: set[Hashable] = {("thread", name)}
        for op in program[ts.op :]:
            if isinstance(op, Read | Write):
                self._access_future(op, reads, writes)
            elif isinstance(op, Punch):
                self._punch_future(world, op, ts if op is program[ts.op] else None, writes)
            elif isinstance(op, Protect):
                v = self.vmas[op.vma]
                writes.add(("log", "image"))
                for i in range(v.pages):
                    writes.add(("pte", v.id, i))
                    reads.update((("cache", v.file, v.pgoff + i), ("page", v.pgoff + i)))
            elif isinstance(op, CopyPages):
                v = self.vmas[op.vma]
                first = ts.cursor if op is program[ts.op] else 0
                for i in range(first, v.pages):
                    writes.update((("snap", v.id, i), ("pte", v.id, i), ("waiters", v.id, i)))
                    reads.update((("cache", v.file, v.pgoff + i), ("page", v.pgoff + i)))
                writes.update(
                    ("thread", t) for t, s in world.threads.items() if s.pc == "userfault"
                )
            else:
                writes.update(
                    (("uffd",), ("log", "notified"), ("log", "resolved"), ("log", "saved"))
                )
                pages = {(e.vma, e.index) for e in world.queue}
                if ts.event is not None:
                    pages.add((ts.event.vma, ts.event.index))
                for t, prog in self.programs.items():
                    if t in frozen or t == name:
                        continue
                    for later in prog[world.threads[t].op :]:
                        if isinstance(later, Read | Write) and self._may_userfault(later):
                            pages.add((later.vma, later.index))
                if op.prefetch:
                    pages |= {
                        (vid, j)
                        for vid, i in pages
                        for j in range(i + 1, min(i + 1 + op.prefetch, self.vmas[vid].pages))
                    }
                for vid, i in pages:
                    v = self.vmas[vid]
                    fi = v.pgoff + i
                    writes.update(
                        (
                            ("pte", vid, i),
                            ("cache", v.file, fi),
                            ("page", fi),
                            ("alloc",),
                            ("waiters", vid, i),
                            ("snap", vid, i),
                        )
                    )
                writes.update(
                    ("thread", t) for t, s in world.threads.items() if s.pc == "userfault"
                )
        reads |= writes
        return frozenset(reads), frozenset(writes)

    def enablers(self, world: _World, name: str) -> frozenset[str] | None:
        """If thread ``name`` cannot move in ``world``, every thread whose step could let it
        (empty: it never moves again); None if it can move now.

        Only a server wakes a userfault, only a punch of the file wakes shmem_falloc_wait,
        only the holder unlocks a page, and only a fault queues a message for an idle server.
        """
        ts = world.threads[name]
        program = self.programs[name]
        if ts.op >= len(program):
            return frozenset()
        op = program[ts.op]
        if ts.pc == "userfault":
            # A message's ioctl wakes it, and so does the snapshot copier's unprotect.
            return frozenset(
                t
                for t, p in self.programs.items()
                if any(isinstance(o, Serve | CopyPages) for o in p)
            )
        if ts.pc == "falloc_wait":
            assert isinstance(op, Read | Write)
            file = self.vmas[op.vma].file
            return frozenset(
                t
                for t, p in self.programs.items()
                if any(isinstance(o, Punch) and o.file == file for o in p)
            )
        if isinstance(op, Punch) and ts.pc == "access" and op.file in world.falloc:
            return frozenset(
                t
                for t, p in self.programs.items()
                if t != name and any(isinstance(o, Punch) and o.file == op.file for o in p)
            )
        holder = self._lock_wait(world, name, ts, op)
        if holder is not None:
            return frozenset({holder}) & set(self.programs) - {name}
        if isinstance(op, Serve) and ts.event is None and not world.queue:
            return frozenset(
                t
                for t, p in self.programs.items()
                if any(
                    isinstance(o, Read | Write) and self._may_userfault(o)
                    for o in p[world.threads[t].op :]
                )
            )
        return None

    def _lock_wait(self, world: _World, name: str, ts: _ThreadState, op: Op) -> str | None:
        """The holder of the page lock ``name`` waits for, if it waits for one."""
        frame: _Frame | None = None
        if ts.pc == "lock_page" and ts.page is not None:
            frame = world.frames[ts.page]
        elif ts.pc == "truncate" and isinstance(op, Punch):
            for fi in range(ts.cursor, op.start + op.pages):
                fid = world.cache.get((op.file, fi))
                if fid is not None:
                    frame = world.frames[fid]
                    break
        elif ts.pc == "continue" and ts.event is not None:
            v = self.vmas[ts.event.vma]
            fid = world.cache.get((v.file, v.pgoff + ts.event.index))
            frame = None if fid is None else world.frames[fid]
        if frame is None or frame.locked is None or frame.locked == name:
            return None
        return frame.locked

    def _punch_future(
        self, world: _World, op: Punch, ts: _ThreadState | None, writes: set[Hashable]
    ) -> None:
        # ts: where the punch is, if it is the op under way (its done steps touch nothing more).
        pc = "access" if ts is None else ts.pc
        end = op.start + op.pages
        victims = [
            v
            for v in self.vmas
            if v.file == op.file and v.pgoff < end and op.start < v.pgoff + v.pages
        ]
        writes.update((("inode", op.file), ("fwait", op.file)))
        writes.update(("falloc", op.file, fi) for fi in range(op.start, end))
        writes.update(("thread", t) for t, s in world.threads.items() if s.pc == "falloc_wait")
        if pc == "end":
            return
        first = ts.cursor if ts is not None and pc in ("truncate", "remove") else op.start
        for fi in range(first, end):
            writes.update((("cache", op.file, fi), ("page", fi)))
        unmapping = victims[ts.cursor :] if ts is not None and pc == "unmap" else victims
        for v in victims:
            lo = op.start if v in unmapping and pc in ("access", "unmap") else first
            for fi in range(max(lo, v.pgoff), min(end, v.pgoff + v.pages)):
                writes.add(("pte", v.id, fi - v.pgoff))

    def _punched(self, file: int, index: int) -> bool:
        """Some thread's program punches file page ``index``."""
        return any(
            isinstance(op, Punch) and op.file == file and op.start <= index < op.start + op.pages
            for p in self.programs.values()
            for op in p
        )

    def _may_userfault(self, op: Read | Write) -> bool:
        register = self.vmas[op.vma].register
        if isinstance(op, Read):
            return bool(register & (_Mode.MISSING | _Mode.MINOR))
        return bool(register)

    def _access_future(self, op: Read | Write, reads: set[Hashable], writes: set[Hashable]) -> None:
        v = self.vmas[op.vma]
        fi = v.pgoff + op.index
        writes.update((("pte", v.id, op.index), ("cache", v.file, fi), ("page", fi), ("alloc",)))
        # shmem_fault() reads inode->i_private, and writes it only to sleep on a punch.
        reads.add(("falloc", v.file, fi))
        if self._punched(v.file, fi):
            writes.add(("fwait", v.file))
        if self._may_userfault(op):
            writes.update((("uffd",), ("waiters", v.id, op.index)))
        if isinstance(op, Read) and self.should_fault_around(v):
            for j in self.fault_around_window(v, op.index):
                writes.add(("pte", v.id, j))
                reads.update((("cache", v.file, v.pgoff + j), ("page", v.pgoff + j)))

    # -- Read and Write --------------------------------------------------------------------------
    def _access(self, w: _World, name: str, ts: _ThreadState, op: Read | Write) -> Label | None:
        vma = self.vmas[op.vma]
        i = op.index
        write = isinstance(op, Write)
        pc = ts.pc
        if pc == "access":
            return self._hw_access(w, name, ts, op, vma)
        if pc == "fault_around":
            return self._fault_around(w, name, ts, vma, i)
        if pc == "shmem_fault":
            return self._shmem_fault(w, name, ts, vma, i)
        if pc == "get_folio":
            return self._get_folio(w, name, ts, vma, i)
        if pc == "lock_page":
            return self._lock_page(w, name, ts, vma, i)
        if pc == "finish_fault":
            return self._finish_fault(w, name, ts, vma, i, write)
        if pc == "wp_page":
            return self._wp_page(w, name, ts, vma, i)
        assert pc in _ASLEEP, pc
        return None

    def _hw_access(
        self, w: _World, name: str, ts: _ThreadState, op: Read | Write, vma: Vma
    ) -> Label:
        i = op.index
        write = isinstance(op, Write)
        pte = w.pte(vma.id, i)
        if isinstance(pte, _Present):
            frame = w.frame(pte.frame)
            if isinstance(op, Read):
                w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults, value=frame.data))
                w.writes.add(("value", name))  # read by no step: marks what a load returned
                return Label("load", f"page {i} reads {frame.data!r} (frame #{pte.frame})")
            if pte.writable:
                w.set_frame(pte.frame, replace(frame, data=op.data))
                w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
                change = f"page {i}: frame #{pte.frame} {frame.data!r} -> {op.data!r}"
                if _in_hole(w, vma, i) and w.cache.get((vma.file, vma.pgoff + i)) == pte.frame:
                    change += " (a frame the punch in progress will drop)"
                return Label("store", change)
            w.set_thread(name, replace(ts, pc="wp_page", orig=pte, faults=ts.faults + 1))
            protection = "uffd-wp" if pte.uffd_wp else "read-only"
            return Label("handle_mm_fault", f"write fault on {protection} page {i}: do_wp_page")
        kind = "none" if pte is None else "uffd-wp marker"
        if not write and self.should_fault_around(vma):
            nxt, how = "fault_around", "do_read_fault -> do_fault_around"
        else:
            nxt = "shmem_fault"
            how = (
                "do_shared_fault"
                if write and vma.shared
                else "do_cow_fault"
                if write
                else "do_read_fault, no fault-around"
            )
        w.set_thread(name, replace(ts, pc=nxt, orig=pte, faults=ts.faults + 1))
        access = "write" if write else "read"
        return Label("handle_mm_fault", f"{access} fault on page {i} (PTE {kind}): {how}")

    def _fault_around(self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int) -> Label:
        window = self.fault_around_window(vma, i)
        mapped: list[int] = []
        skipped: list[str] = []
        for vi in window:
            fid = w.cached(vma.file, vma.pgoff + vi)
            if fid is None:
                continue
            frame = w.frame(fid)
            # next_uptodate_folio(): skip locked and !uptodate folios.
            if frame.locked is not None or not frame.uptodate:
                skipped.append(f"{vi} ({'locked' if frame.locked else 'not uptodate'})")
                continue
            # filemap_map_folio_range(): only pte_none() slots (a marker is not none).
            if w.pte(vma.id, vi) is not None:
                continue
            w.set_pte(vma.id, vi, _Present(fid, writable=False, uffd_wp=False))
            mapped.append(vi)
        hit = i in mapped
        w.set_thread(name, replace(ts, pc="access" if hit else "shmem_fault"))
        change = f"window pages {window.start}-{window.stop - 1}: mapped {_pages(mapped)} read-only"
        doomed = [vi for vi in mapped if _in_hole(w, vma, vi)]
        if doomed:
            change += f" (page {_pages(doomed)} inside the hole being punched: not checked here)"
        if skipped:
            change += f"; skipped {', '.join(skipped)}"
        change += (
            "; fault done (VM_FAULT_NOPAGE)" if hit else "; faulting page not mapped: __do_fault"
        )
        return Label("do_fault_around", change)

    def _shmem_fault(self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int) -> Label:
        fi = vma.pgoff + i
        span = w.hole(vma.file, fi)
        if span is not None:
            w.set_falloc_sleepers(vma.file, w.falloc_sleepers(vma.file) | {name})
            w.set_thread(name, replace(ts, pc="falloc_wait"))
            return Label(
                "shmem_fault",
                f"file page {fi} is in the hole [{span[0]}, {span[1]}) being punched: "
                "shmem_falloc_wait sleeps",
            )
        w.set_thread(name, replace(ts, pc="get_folio"))
        return Label("shmem_fault", f"no hole punch covers file page {fi}: shmem_get_folio")

    def _get_folio(self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int) -> Label:
        fi = vma.pgoff + i
        if fi >= self.files[vma.file].pages:
            w.set_thread(name, _ThreadState(op=ts.op + 1, pc="sigbus", faults=ts.faults))
            return Label("shmem_fault", f"file page {fi} is beyond i_size: SIGBUS")
        fid = w.cached(vma.file, fi)
        if fid is not None and vma.register & _Mode.MINOR:
            return self._userfault(w, name, ts, vma, i, _Mode.MINOR)
        if fid is None and vma.register & _Mode.MISSING:
            return self._userfault(w, name, ts, vma, i, _Mode.MISSING)
        if fid is None:
            # shmem_alloc_and_add_folio(): a new zeroed folio, locked, added to the cache.
            fid = w.new_frame(_Frame("0", name, True, fi, "fault", vma.id))
            w.set_cached(vma.file, fi, fid)
            w.set_thread(name, replace(ts, pc="finish_fault", page=fid))
            return Label("shmem_get_folio", f"file page {fi} absent: new zero frame #{fid}, locked")
        w.set_thread(name, replace(ts, pc="lock_page", page=fid))
        return Label("shmem_get_folio", f"file page {fi} is frame #{fid} in the cache: lock it")

    def _lock_page(self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int) -> Label | None:
        assert ts.page is not None
        frame = w.frame(ts.page)
        if frame.locked is not None:
            return None
        fi = vma.pgoff + i
        if w.cached(vma.file, fi) != ts.page:
            w.set_thread(name, replace(ts, pc="get_folio", page=None))
            return Label(
                "shmem_get_folio", f"frame #{ts.page} was truncated meanwhile: repeat the lookup"
            )
        w.set_frame(ts.page, replace(frame, locked=name))
        w.set_thread(name, replace(ts, pc="finish_fault"))
        return Label("folio_lock", f"locked frame #{ts.page}")

    def _finish_fault(
        self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int, write: bool
    ) -> Label:
        fid = ts.page
        assert fid is not None
        frame = w.frame(fid)
        pte = w.pte(vma.id, i)
        # The fault holds the page lock from shmem_get_folio() to here; unlock it in this step.
        w.set_frame(fid, replace(frame, locked=None))
        w.set_thread(name, replace(ts, pc="access", page=None, orig=None))
        if pte != ts.orig:
            return Label("finish_fault", f"PTE of page {i} changed meanwhile: unlock, retry")
        # A marker's protection survives the fault (vmf_orig_pte_uffd_wp): mapped read-only.
        uffd_wp = isinstance(ts.orig, _Marker)
        if write and not vma.shared:
            copy = w.new_frame(_Frame(frame.data, None, True, frame.index, "cow", vma.id))
            w.set_pte(vma.id, i, _Present(copy, writable=not uffd_wp, uffd_wp=uffd_wp))
            return Label("finish_fault", f"page {i}: private copy #{copy} of frame #{fid}")
        w.set_pte(vma.id, i, _Present(fid, writable=write and not uffd_wp, uffd_wp=uffd_wp))
        how = "writable" if write and not uffd_wp else "read-only"
        if uffd_wp:
            how += ", uffd-wp kept from the marker"
        return Label("finish_fault", f"page {i} -> frame #{fid} ({how}); unlock frame")

    def _wp_page(self, w: _World, name: str, ts: _ThreadState, vma: Vma, i: int) -> Label:
        pte = w.pte(vma.id, i)
        if pte != ts.orig or not isinstance(pte, _Present):
            w.set_thread(name, replace(ts, pc="access", orig=None))
            return Label("do_wp_page", f"PTE of page {i} changed meanwhile: retry")
        if pte.uffd_wp and vma.register & _Mode.WP:
            return self._userfault(w, name, ts, vma, i, _Mode.WP, pte.frame)
        w.set_thread(name, replace(ts, pc="access", orig=None))
        if vma.shared or w.frame(pte.frame).anon:
            w.set_pte(vma.id, i, _Present(pte.frame, writable=True, uffd_wp=False))
            return Label("wp_page_reuse", f"page {i}: frame #{pte.frame} made writable")
        src = w.frame(pte.frame)
        copy = w.new_frame(_Frame(src.data, None, True, src.index, "cow", vma.id))
        w.set_pte(vma.id, i, _Present(copy, writable=True, uffd_wp=False))
        return Label("wp_page_copy", f"page {i}: private copy #{copy} of frame #{pte.frame}")

    def _userfault(
        self,
        w: _World,
        name: str,
        ts: _ThreadState,
        vma: Vma,
        i: int,
        mode: _Mode,
        frame: int | None = None,
    ) -> Label:
        assert mode.name is not None
        w.push_event(_Event(mode, vma.id, i, name, frame))
        w.set_sleepers(vma.id, i, w.sleepers(vma.id, i) | {name})
        w.set_thread(name, replace(ts, pc="userfault", page=None, orig=None))
        return Label("handle_userfault", f"{mode.name} message for page {i} queued; thread sleeps")

    def _wake(self, w: _World, vma: int, index: int) -> list[str]:
        woken = sorted(w.sleepers(vma, index))
        w.set_sleepers(vma, index, frozenset())
        for t in woken:
            w.set_thread(t, replace(w.threads[t], pc="access", page=None, orig=None))
        return woken

    # -- hole punch ------------------------------------------------------------------------------
    def _punch(self, w: _World, name: str, ts: _ThreadState, op: Punch) -> Label | None:
        start, end = op.start, op.start + op.pages
        victims = [
            v
            for v in self.vmas
            if v.file == op.file and v.pgoff < end and start < v.pgoff + v.pages
        ]
        pc = ts.pc
        if pc == "access":
            # shmem_fallocate() holds inode_lock from here to the end: punches of one file
            # run one after the other (i_private is set exactly while one is in progress).
            if w.punching(op.file) is not None:
                return None
            w.set_punching(op.file, (start, end))
            nxt = (
                replace(ts, pc="unmap", cursor=0)
                if victims
                else replace(ts, pc="truncate", cursor=start)
            )
            w.set_thread(name, nxt)
            return Label("shmem_fallocate", f"inode->i_private = hole [{start}, {end})")
        if pc == "unmap":
            vma = victims[ts.cursor]
            changes = []
            for fi in range(max(start, vma.pgoff), min(end, vma.pgoff + vma.pages)):
                vi = fi - vma.pgoff
                pte = w.pte(vma.id, vi)
                # even_cows=0: private COW copies stay mapped.
                if not isinstance(pte, _Present) or w.frame(pte.frame).anon:
                    continue
                keep = self.preset.pte_markers and pte.uffd_wp and bool(vma.register & _Mode.WP)
                w.set_pte(vma.id, vi, _MARKER if keep else None)
                if keep:
                    changes.append(f"page {vi} zapped, uffd-wp marker left")
                elif pte.uffd_wp:
                    changes.append(f"page {vi} zapped, its uffd-wp bit lost")
                else:
                    changes.append(f"page {vi} zapped")
            last = ts.cursor + 1 == len(victims)
            nxt = (
                replace(ts, pc="truncate", cursor=start)
                if last
                else replace(ts, cursor=ts.cursor + 1)
            )
            w.set_thread(name, nxt)
            return Label(
                "unmap_mapping_range", f"VMA {vma.id}: {'; '.join(changes) or 'nothing mapped'}"
            )
        if pc == "truncate":
            for fi in range(ts.cursor, end):
                fid = w.cached(op.file, fi)
                if fid is None:
                    continue
                frame = w.frame(fid)
                if frame.locked is not None:
                    return None
                w.set_frame(fid, replace(frame, locked=name))
                w.set_thread(name, replace(ts, pc="remove", cursor=fi, page=fid))
                return Label("shmem_undo_range", f"locked frame #{fid} (file page {fi})")
            w.set_thread(name, replace(ts, pc="end", cursor=end))
            return Label("shmem_undo_range", "no page left in the hole")
        if pc == "remove":
            fid = ts.page
            assert fid is not None
            fi = ts.cursor
            frame = w.frame(fid)
            unmapped = []
            # truncate_cleanup_folio() calls unmap_mapping_folio() only while the folio is
            # still mapped somewhere; then it zaps the folio's PTEs and, at its index, markers
            # too (ZAP_FLAG_DROP_MARKER). A folio the pre-unmap left unmapped keeps every marker.
            # (A PTE mapping the folio is at index fi of a VMA of the file: read those, noted.)
            around = [(vma, fi - vma.pgoff) for vma in victims if 0 <= fi - vma.pgoff < vma.pages]
            ptes = [w.pte(vma.id, vi) for vma, vi in around]
            still_mapped = any(isinstance(p, _Present) and p.frame == fid for p in ptes)
            for (vma, vi), pte in zip(around, ptes, strict=True):
                if (isinstance(pte, _Marker) and still_mapped) or (
                    isinstance(pte, _Present) and pte.frame == fid
                ):
                    w.set_pte(vma.id, vi, None)
                    unmapped.append(f"VMA {vma.id} page {vi}")
            w.set_cached(op.file, fi, None)
            w.set_frame(fid, replace(frame, locked=None))
            w.set_thread(name, replace(ts, pc="truncate", cursor=fi + 1, page=None))
            gone = f"unmapped {', '.join(unmapped)}; " if unmapped else ""
            return Label(
                "truncate_inode_folio",
                f"{gone}frame #{fid} ({frame.data!r}) removed from the page cache",
            )
        assert pc == "end", pc
        w.set_punching(op.file, None)
        sleepers = sorted(w.falloc_sleepers(op.file))
        w.set_falloc_sleepers(op.file, frozenset())
        for t in sleepers:
            w.set_thread(t, replace(w.threads[t], pc="access"))
        w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
        woke = f"; woke {', '.join(sleepers)}" if sleepers else ""
        return Label("shmem_fallocate", f"hole punched, inode->i_private cleared{woke}")

    # -- the userfaultfd server ------------------------------------------------------------------
    def _serve(self, w: _World, name: str, ts: _ThreadState, op: Serve) -> Label | None:
        ev = ts.event
        if ev is None:
            ev = w.pop_event()
            if ev is None:
                return None
            w.log("notified")
            w.notified = w.notified | {(ev.mode, ev.vma, ev.index)}
            wp = "save" if op.snapshot else "snapshot"
            pc = {_Mode.MISSING: "copy", _Mode.MINOR: "update", _Mode.WP: wp}[ev.mode]
            w.set_thread(name, replace(ts, pc=pc, event=ev))
            assert ev.mode.name is not None
            return Label("read(uffd)", f"{ev.mode.name} message: VMA {ev.vma} page {ev.index}")
        vma = self.vmas[ev.vma]
        fi = vma.pgoff + ev.index
        idle = _ThreadState(op=ts.op, pc="wait", faults=ts.faults)
        if ts.pc == "copy":
            result = self._copy_page(w, vma, ev.index)
            woken = self._wake(w, ev.vma, ev.index)
            last = min(ev.index + 1 + op.prefetch, vma.pages)
            more = ev.index + 1 < last
            w.set_thread(name, replace(ts, pc="prefetch", cursor=ev.index + 1) if more else idle)
            return Label("UFFDIO_COPY", f"page {ev.index}: {result}; woke {_pages(woken)}")
        if ts.pc == "prefetch":
            i = ts.cursor
            result = self._copy_page(w, vma, i)
            if result == "EEXIST":
                result = "already there: the copy stops (done), resume after it"
            woken = self._wake(w, ev.vma, i)
            last = min(ev.index + 1 + op.prefetch, vma.pages)
            w.set_thread(name, replace(ts, cursor=i + 1) if i + 1 < last else idle)
            return Label("UFFDIO_COPY", f"prefetch page {i}: {result}; woke {_pages(woken)}")
        if ts.pc == "update":
            fid = w.cached(vma.file, fi)
            if fid is not None:
                w.set_frame(fid, replace(w.frame(fid), data=f"u{fi}"))
            w.set_thread(name, replace(ts, pc="continue"))
            what = f"frame #{fid} <- {'u' + str(fi)!r}" if fid is not None else "page is gone"
            return Label("server", f"update file page {fi} through its own mapping: {what}")
        if ts.pc == "continue":
            # UFFDIO_CONTINUE -> mfill_atomic_pte_continue(): the cached page, locked, mapped.
            fid = w.cached(vma.file, fi)
            if fid is None:
                result = "EFAULT (no page in the cache)"
            else:
                if w.frame(fid).locked is not None:
                    return None
                pte = w.pte(vma.id, ev.index)
                if isinstance(pte, _Present):
                    result = "EEXIST"
                else:
                    w.set_pte(vma.id, ev.index, _Present(fid, writable=vma.shared, uffd_wp=False))
                    result = f"mapped frame #{fid}"
            w.log("resolved")
            w.resolved = w.resolved | {(ev.vma, ev.index)}
            woken = self._wake(w, ev.vma, ev.index)
            w.set_thread(name, idle)
            return Label("UFFDIO_CONTINUE", f"page {ev.index}: {result}; woke {_pages(woken)}")
        if ts.pc == "snapshot":
            assert ev.frame is not None
            data = w.frame(ev.frame).data
            w.log("saved")
            w.saved = w.saved | {ev.frame}
            w.set_thread(name, replace(ts, pc="unprotect"))
            return Label("server", f"saved frame #{ev.frame} ({data!r}) to the snapshot")
        if ts.pc == "save":
            # The live snapshot's fault thread: the page as the writer found it, unless the
            # copier saved it first.
            assert ev.frame is not None
            w.set_thread(name, replace(ts, pc="unprotect"))
            if w.snapped(ev.vma, ev.index) is not None:
                return Label("snapshot", f"page {ev.index} already saved by the copier")
            data = w.frame(ev.frame).data
            w.set_snapped(ev.vma, ev.index, (ev.frame, data))
            return Label("snapshot", f"saved page {ev.index}: frame #{ev.frame} ({data!r})")
        assert ts.pc == "unprotect", ts.pc
        result, woken = self._unprotect(w, vma, ev.index)
        w.set_thread(name, idle)
        return Label("UFFDIO_WRITEPROTECT", f"page {ev.index}: {result}; woke {_pages(woken)}")

    def _copy_page(self, w: _World, vma: Vma, i: int) -> str:
        # UFFDIO_COPY -> shmem_mfill_atomic_pte(): fails with EEXIST if the page is there.
        fi = vma.pgoff + i
        fid = w.cached(vma.file, fi) if vma.shared else None
        pte = w.pte(vma.id, i)
        if fid is not None or isinstance(pte, _Present):
            return "EEXIST"
        origin = "copy" if vma.shared else "cow"
        fid = w.new_frame(_Frame(f"s{fi}", None, True, fi, origin, vma.id))
        if vma.shared:
            w.set_cached(vma.file, fi, fid)
        w.set_pte(vma.id, i, _Present(fid, writable=True, uffd_wp=False))
        return f"new frame #{fid} ({'s' + str(fi)!r}) cached and mapped"

    def _unprotect(self, w: _World, vma: Vma, i: int) -> tuple[str, list[str]]:
        """UFFDIO_WRITEPROTECT(0) of one page, waking the threads blocked on it."""
        pte = w.pte(vma.id, i)
        if isinstance(pte, _Present) and pte.uffd_wp:
            w.set_pte(vma.id, i, _Present(pte.frame, pte.writable, uffd_wp=False))
            result = "uffd-wp cleared"
        elif isinstance(pte, _Marker):
            w.set_pte(vma.id, i, None)
            result = "marker cleared"
        else:
            result = "nothing protected there any more"
        return result, self._wake(w, vma.id, i)

    # -- the live snapshot's protect instant and background copy ----------------------------------
    def _page_now(self, w: _World, vma: Vma, i: int) -> tuple[int | None, str]:
        """What reading page ``i`` finds: the cached frame and its contents, or zeros."""
        fid = w.cached(vma.file, vma.pgoff + i)
        return (None, "0") if fid is None else (fid, w.frame(fid).data)

    def _protect(self, w: _World, name: str, ts: _ThreadState, op: Protect) -> Label:
        vma = self.vmas[op.vma]
        image = dict(w.image)
        marked = []
        for i in range(vma.pages):
            pte = w.pte(vma.id, i)
            if isinstance(pte, _Present):
                w.set_pte(vma.id, i, _Present(pte.frame, writable=False, uffd_wp=True))
            elif pte is None and self.preset.pte_markers:
                w.set_pte(vma.id, i, _MARKER)
                marked.append(i)
            image[(vma.id, i)] = self._page_now(w, vma, i)
        w.log("image")
        w.image = image
        w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
        how = f"; markers on unmapped pages {_pages(marked)}" if marked else ""
        return Label("UFFDIO_WRITEPROTECT", f"protect instant: pages 0-{vma.pages - 1}{how}")

    def _copy_pages(self, w: _World, name: str, ts: _ThreadState, op: CopyPages) -> Label:
        vma = self.vmas[op.vma]
        if ts.pc == "unprotect":
            result, woken = self._unprotect(w, vma, ts.cursor)
            w.set_thread(name, replace(ts, pc="access", cursor=ts.cursor + 1))
            return Label("UFFDIO_WRITEPROTECT", f"page {ts.cursor}: {result}; woke {_pages(woken)}")
        for i in range(ts.cursor, vma.pages):
            if w.snapped(vma.id, i) is not None:
                continue
            fid, data = self._page_now(w, vma, i)
            w.set_snapped(vma.id, i, (fid, data))
            w.set_thread(name, replace(ts, pc="unprotect", cursor=i))
            where = "zeros (no page)" if fid is None else f"frame #{fid}"
            return Label("copy", f"saved page {i}: {where} ({data!r})")
        w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
        return Label("copy", "every page saved: snapshot complete")

"""The kernel rules: shmem faults, fault-around, hole punching and userfaultfd, step by step.

Design note
-----------
Each thread runs a program of ops (Read, Write, Punch, Serve). An op advances one *step* at a
time, and a step is one critical section of the kernel code it mirrors: whatever the kernel does
under one lock (or one RCU walk) happens in one step, and another thread can run between two
steps exactly where the kernel drops one lock and takes the next. The steps:

=================  =========================================================  ==================
step (Pc)          mirrors                                                    lock granularity
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

The rules live in one module per family, beside this one: the fault path of a Read or Write
(:mod:`._fault`: access to finish_fault, wp_page, userfault and wake), hole punching
(:mod:`._punch`), the server side and the live snapshot's threads (:mod:`._server`), and the
persistent-set footprints (:mod:`._future`); the op records are in :mod:`._ops`. Rules are plain
functions of (config, Step, thread, its state, its op), not mixins of Kernel: a rule only reads
the frozen configuration (:class:`._config.Config`: VMAs, files, programs, preset, the
fault-around window) and changes the World through the Step it is handed (which notes the
footprint, in the keys of :mod:`._footprint`), so its inputs are all in its signature and each
module reads on its own, where mixins would spread one class's attributes over five files.
:func:`advance` picks the rule family by the op's type; Kernel keeps the builder (each change
makes a new Config) and the direct API.

A userfault queues a message and puts the thread to sleep; the ioctl that resolves it wakes it
and the access starts again from the top, as the kernel's VM_FAULT_RETRY does. Simplifications
(each noted where it is made): one 4 KiB page per folio, no swap, no THP, the whole PMD is one
page table; truncation locks pages in index order (the kernel's trylock pass then blocking pass
end the same way); EVENT_REMOVE is not modelled (fallocate() does not send it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import final

from .._flags import Mode as _Mode
from . import _engine, _fault, _punch, _server
from . import _footprint as fp
from ._config import Config as _Config
from ._config import fault_around_pages as _fault_around_pages
from ._ops import CopyPages as _CopyPages
from ._ops import File as _File
from ._ops import Label as _Label
from ._ops import Op as _Op
from ._ops import Protect as _Protect
from ._ops import Punch as _Punch
from ._ops import Read as _Read
from ._ops import Serve as _Serve
from ._ops import SigBusError as _SigBusError
from ._ops import Vma as _Vma
from ._ops import WouldBlock as _WouldBlock
from ._ops import Write as _Write
from ._ops import WriteBack as _WriteBack
from ._ops import WriteProtect as _WriteProtect
from ._presets import Preset as _Preset
from ._presets import get_preset as _get_preset
from ._state import ASLEEP as _ASLEEP
from ._state import MARKER as _MARKER
from ._state import PAGE_SIZE as _PAGE_SIZE
from ._state import Frame as _Frame
from ._state import Pc as _Pc
from ._state import Present as _Present
from ._state import Pte as _Pte
from ._state import Step as _Step
from ._state import ThreadState as _ThreadState
from ._state import World as _World

__all__ = ["Kernel", "advance", "faults", "finished"]


def advance(cfg: _Config, world: _World, name: str) -> _engine.Move[_World, _Label] | None:
    """One step of thread ``name`` from ``world``: the new World, what changed and the objects
    the step read and wrote; None if the thread is asleep, blocked on a lock, or finished.
    ``world`` is left untouched."""
    program = cfg.programs[name]
    if world.thread(name).op >= len(program):
        return None
    w = _Step(world)
    state = w.thread(name)
    w.writes.add(fp.Thread(name))  # every step moves its own thread on
    op = program[state.op]
    label: _Label | None
    match op:
        case _Read() | _Write():
            label = _fault.access(cfg, w, name, state, op)
        case _Punch():
            label = _punch.punch(cfg, w, name, state, op)
        case _Serve():
            label = _server.serve(cfg, w, name, state, op)
        case _Protect():
            label = _server.protect(cfg, w, name, state, op)
        case _CopyPages():
            label = _server.copy_pages(cfg, w, name, state, op)
        case _WriteProtect():
            label = _server.write_protect(cfg, w, name, state, op)
        case _WriteBack():
            label = _server.write_back(cfg, w, name, state, op)
    if label is None:
        return None
    return _engine.Move(w.after, label, frozenset(w.reads), frozenset(w.writes))


def finished(cfg: _Config, world: _World) -> bool:
    """Every thread has run its program to the end, a server up to its Serve (which never
    ends): the pager's handler must have finished its eviction."""
    return all(
        world.thread(n).op >= next((j for j, op in enumerate(p) if isinstance(op, _Serve)), len(p))
        for n, p in cfg.programs.items()
    )


def faults(world: _World) -> int:
    """Page faults the threads took (entries into handle_mm_fault), all together."""
    return sum(t.faults for _, t in world.threads())


@final
class Kernel:
    """The model kernel: shmem files, address spaces, and the rules that move threads.

    The same rules serve direct calls (``read``, ``write``, ``punch_hole``: one thread run to
    completion) and the explorer (``advance``: one step of one thread from any World).
    ``config`` is the fixed setup built so far (a new frozen record after each ``shmem_file``,
    ``mmap`` and ``spawn``); ``world`` the state the direct calls have reached.
    """

    def __init__(self, preset: _Preset | str = "upstream", fault_around_bytes: int = 65536) -> None:
        self.fault_around_bytes = fault_around_bytes
        self.config = _Config(_get_preset(preset), _fault_around_pages(fault_around_bytes))
        self.world = _World()

    @property
    def preset(self) -> _Preset:
        return self.config.preset

    @property
    def fault_around_pages(self) -> int:
        return self.config.fault_around_pages

    @property
    def files(self) -> tuple[_File, ...]:
        return self.config.files

    @property
    def vmas(self) -> tuple[_Vma, ...]:
        return self.config.vmas

    @property
    def programs(self) -> Mapping[str, tuple[_Op, ...]]:
        return self.config.programs

    # -- building the system ---------------------------------------------------------------------
    def shmem_file(
        self,
        pages: int,
        cached: Iterable[int] = (),
        *,
        locked: Iterable[int] = (),
        not_uptodate: Iterable[int] = (),
    ) -> _File:
        """A shmem file of ``pages`` pages; ``cached`` pages are in the page cache, uptodate.

        ``locked`` and ``not_uptodate`` add cached pages in those states (as if another thread
        were reading or truncating them), to exercise filemap_map_pages()'s checks.
        """
        if pages < 0:
            raise ValueError(f"a file has zero or more pages, got {pages}")
        f = _File(len(self.files), pages)
        self.config = self.config.with_file(f)
        w = _Step(self.world)  # Worlds are values: never change one in place
        lock_set, stale = set(locked), set(not_uptodate)
        for i in sorted(set(cached) | lock_set | stale):
            if not 0 <= i < pages:
                raise ValueError(f"cached page {i} is outside the file's {pages} pages")
            owner = "setup" if i in lock_set else None
            fid = w.new_frame(_Frame(f"p{i}", owner, i not in stale, i, "setup"))
            w.set_cached(f.id, i, fid)
        self.world = w.after
        return f

    def mmap(
        self,
        file: _File,
        address: int,
        pages: int,
        pgoff: int = 0,
        shared: bool = True,
        register: _Mode | None = None,
        *,
        mm: int = 0,
    ) -> _Vma:
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
        v = _Vma(len(self.vmas), mm, address, pages, file.id, pgoff, shared, register or _Mode(0))
        self.config = self.config.with_vma(v)
        return v

    def spawn(self, name: str, *ops: _Op) -> None:
        """Add a thread that will run ``ops`` in order (it runs when stepped)."""
        if name in self.programs:
            raise ValueError(f"thread {name!r} exists")
        self.config = self.config.with_programs({**self.programs, name: ops})
        w = _Step(self.world)
        w.set_thread(name, _ThreadState())
        self.world = w.after

    @property
    def thread_names(self) -> tuple[str, ...]:
        return tuple(self.programs)

    # -- direct use: one thread, to completion -----------------------------------------------------
    def read(self, vma: _Vma, index: int) -> str:
        """Load from page ``index`` of ``vma``; return the page's contents."""
        self._check_index(vma, index)
        state = self._direct(_Read(vma.id, index))
        if state.pc == _Pc.SIGBUS:
            raise _SigBusError(f"page {index} of VMA {vma.id} is beyond the end of the file")
        assert state.value is not None
        return state.value

    def write(self, vma: _Vma, index: int, data: str) -> None:
        """Store ``data`` to page ``index`` of ``vma``."""
        self._check_index(vma, index)
        if self._direct(_Write(vma.id, index, data)).pc == _Pc.SIGBUS:
            raise _SigBusError(f"page {index} of VMA {vma.id} is beyond the end of the file")

    def punch_hole(self, file: _File, start: int, pages: int) -> None:
        """fallocate(PUNCH_HOLE) of ``pages`` pages from file page ``start``."""
        self._direct(_Punch(file.id, start, pages))

    def writeprotect(self, vma: _Vma, index: int, *, protect: bool = True) -> None:
        """UFFDIO_WRITEPROTECT one page, as the server does; the server notes the frame.
        ``protect=False`` lifts the protection (UFFDIO_WRITEPROTECT(0)), as a server resolving
        a WP fault does."""
        w = _Step(self.world)
        pte = w.pte(vma.id, index)
        if not protect:
            _server.unprotect(w, vma, index)
        elif isinstance(pte, _Present):
            w.set_pte(vma.id, index, _Present(pte.frame, writable=False, uffd_wp=True))
            w.add_protected(pte.frame, w.frame(pte.frame).data)
        elif pte is None and self.preset.pte_markers:
            # change_pte_range() protects a none PTE of a file mapping with a marker.
            w.set_pte(vma.id, index, _MARKER)
        self.world = w.after

    def copy(self, vma: _Vma, index: int, *, wp: bool = False) -> str:
        """UFFDIO_COPY into page ``index``, as a server resolving a MISSING fault does: the
        store's contents (``s<file page>``; with ``wp``, MODE_WP as the pager fills, whatever
        its store holds now, mapped read-only with uffd-wp). Returns what happened."""
        self._check_index(vma, index)
        w = _Step(self.world)
        result = _server.copy_page(w, vma, index, wp=wp)
        self.world = w.after
        return result

    def mark_dirty(self, vma: _Vma, index: int) -> None:
        """The pager's record that page ``index`` is dirty (its handler notes it on a WP fault)."""
        self._check_index(vma, index)
        w = _Step(self.world)
        w.set_dirty(vma.file, vma.pgoff + index, True)
        self.world = w.after

    def mapped(self, vma: _Vma) -> set[int]:
        """VMA page indexes with a present PTE."""
        return {i for (v, i), p in self.world.ptes() if v == vma.id and isinstance(p, _Present)}

    def pte(self, vma: _Vma, index: int) -> _Pte:
        return self.world.pte(vma.id, index)

    def page(self, file: _File, index: int) -> _Frame | None:
        """The frame in the page cache at file page ``index``, or None."""
        fid = self.world.cached(file.id, index)
        return None if fid is None else self.world.frame(fid)

    def step(self, name: str) -> _Label:
        """Advance thread ``name`` by one step (raises WouldBlock if it cannot move)."""
        moved = self.advance(self.world, name)
        if moved is None:
            raise _WouldBlock(self._why(self.world, name))
        self.world = moved.state
        return moved.label

    def run(self, name: str) -> list[_Label]:
        """Step thread ``name`` until its program ends (raises WouldBlock if it cannot move)."""
        labels = []
        while self.world.thread(name).op < len(self.programs[name]):
            labels.append(self.step(name))
        return labels

    def fault_around_window(self, vma: _Vma, index: int) -> range:
        """VMA page indexes do_fault_around() would try for a fault on page ``index`` (see
        :meth:`._config.Config.fault_around_window`)."""
        return self.config.fault_around_window(vma, index)

    def should_fault_around(self, vma: _Vma) -> bool:
        """Whether a read fault in ``vma`` faults around under this preset and window."""
        return self.config.should_fault_around(vma)

    def _check_index(self, vma: _Vma, index: int) -> None:
        if not 0 <= index < vma.pages:
            raise ValueError(f"page {index} is outside VMA {vma.id} ({vma.pages} pages)")

    def _direct(self, op: _Op) -> _ThreadState:
        name = "_direct"
        self.spawn(name, op)
        try:
            while self.world.thread(name).op < 1:
                before = self.world
                moved = self.advance(before, name)
                if moved is None:
                    raise _WouldBlock(self._why(before, name))
                after = moved.state
                state = after.thread(name)
                if state.pc in _ASLEEP:
                    # Keep what happened before the sleep (fault-around), as the kernel does;
                    # drop the queued message with the thread that would have slept.
                    mode = after.queue[-1].mode if state.pc == _Pc.USERFAULT else None
                    raise _WouldBlock(self._why(after, name), mode)
                self.world = after
            return self.world.thread(name)
        finally:
            self.config = self.config.with_programs(
                {n: p for n, p in self.programs.items() if n != name}
            )
            w = _Step(self.world)
            w.drop_thread(name)
            self.world = w.after

    def _why(self, world: _World, name: str) -> str:
        state = world.thread(name)
        if state.op >= len(self.programs[name]):
            return f"thread {name!r} has finished"
        if state.pc == _Pc.USERFAULT:
            ev = next(e for e in reversed(world.queue) if e.thread == name)
            return f"{ev.mode.name} userfault on page {ev.index} of VMA {ev.vma}"
        if state.pc == _Pc.FALLOC_WAIT:
            return "a hole punch covers the page: shmem_falloc_wait() sleeps"
        op = self.programs[name][state.op]
        if (
            isinstance(op, _Punch)
            and state.pc == _Pc.ACCESS
            and world.punching(op.file) is not None
        ):
            return "another hole punch of the file holds the inode lock"
        if state.pc in (_Pc.LOCK_PAGE, _Pc.TRUNCATE, _Pc.CONTINUE):
            return "waiting for a page lock"
        return f"thread {name!r} cannot move at {state.pc.value}"

    def advance(self, world: _World, name: str) -> _engine.Move[_World, _Label] | None:
        """One step of thread ``name`` from ``world`` (see :func:`advance`); ``world`` is left
        untouched."""
        return advance(self.config, world, name)

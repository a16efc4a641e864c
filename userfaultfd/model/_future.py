"""What a thread may still touch, and who could let it move: the explorer's persistent sets.

``future`` over-approximates, from a thread's remaining program (and, from the World, only who
is asleep and what is queued), the footprint of any number of its own steps; ``enablers`` names
who could let a thread move that cannot. Both speak the vocabulary of ``Kernel.abstract``: a
frame is its file page (``("page", index)``), since which frame a future step meets is not known
yet. They read the World without noting it: they are not steps.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from .._flags import Mode as _Mode
from ._ops import CopyPages, Op, Protect, Punch, Read, Serve, Write
from ._punch import victims
from ._state import Frame as _Frame
from ._state import Pc as _Pc
from ._state import ThreadState as _ThreadState
from ._state import World as _World

if TYPE_CHECKING:
    from ._kernel import Kernel

__all__ = ["enablers", "future"]


def future(
    k: Kernel, world: _World, name: str, frozen: frozenset[str]
) -> tuple[frozenset[Hashable], frozenset[Hashable]]:
    """(reads, writes) that thread ``name`` may touch in any number of its own steps from
    ``world``, while the threads in ``frozen`` stay where they are.

    It is built from the thread's remaining program, not from the World, except for what
    only the present can say: which threads are asleep (only those can be woken by someone
    else: an awake thread in ``frozen`` stays awake), the messages already queued, and who
    could still queue one. A thread asleep whose every waker is frozen takes no step at all.
    """
    ts = world.thread(name)
    program = k.programs[name]
    empty: frozenset[Hashable] = frozenset()
    stalled = enablers(k, world, name)
    if stalled is not None and stalled <= frozen:
        return empty, empty
    reads: set[Hashable] = set()
    writes: set[Hashable] = {("thread", name)}
    asleep = [("thread", t) for t, s in world.threads() if s.pc == _Pc.USERFAULT]
    for op in program[ts.op :]:
        current = ts if op is program[ts.op] else None
        if isinstance(op, Read | Write):
            _access_future(k, op, reads, writes)
        elif isinstance(op, Punch):
            _punch_future(k, world, op, current, writes)
        elif isinstance(op, Protect):
            v = k.vmas[op.vma]
            writes.add(("log", "image"))
            for i in range(v.pages):
                writes.add(("pte", v.id, i))
                reads.update((("cache", v.file, v.pgoff + i), ("page", v.pgoff + i)))
        elif isinstance(op, CopyPages):
            v = k.vmas[op.vma]
            first = ts.cursor if current is not None else 0
            for i in range(first, v.pages):
                writes.update((("snap", v.id, i), ("pte", v.id, i), ("waiters", v.id, i)))
                reads.update((("cache", v.file, v.pgoff + i), ("page", v.pgoff + i)))
            writes.update(asleep)
        else:
            _serve_future(k, world, name, ts, op, frozen, writes)
            writes.update(asleep)
    reads |= writes
    return frozenset(reads), frozenset(writes)


def _serve_future(
    k: Kernel,
    world: _World,
    name: str,
    ts: _ThreadState,
    op: Serve,
    frozen: frozenset[str],
    writes: set[Hashable],
) -> None:
    writes.update((("uffd",), ("log", "notified"), ("log", "resolved"), ("log", "saved")))
    pages = {(e.vma, e.index) for e in world.queue}
    if ts.event is not None:
        pages.add((ts.event.vma, ts.event.index))
    for t, prog in k.programs.items():
        if t in frozen or t == name:
            continue
        for later in prog[world.thread(t).op :]:
            if isinstance(later, Read | Write) and _may_userfault(k, later):
                pages.add((later.vma, later.index))
    if op.prefetch:
        pages |= {
            (vid, j)
            for vid, i in pages
            for j in range(i + 1, min(i + 1 + op.prefetch, k.vmas[vid].pages))
        }
    for vid, i in pages:
        v = k.vmas[vid]
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


def enablers(k: Kernel, world: _World, name: str) -> frozenset[str] | None:
    """If thread ``name`` cannot move in ``world``, every thread whose step could let it
    (empty: it never moves again); None if it can move now.

    Only a server wakes a userfault, only a punch of the file wakes shmem_falloc_wait,
    only the holder unlocks a page, and only a fault queues a message for an idle server.
    """
    ts = world.thread(name)
    program = k.programs[name]
    if ts.op >= len(program):
        return frozenset()
    op = program[ts.op]
    if ts.pc == _Pc.USERFAULT:
        # A message's ioctl wakes it, and so does the snapshot copier's unprotect.
        return frozenset(
            t for t, p in k.programs.items() if any(isinstance(o, Serve | CopyPages) for o in p)
        )
    if ts.pc == _Pc.FALLOC_WAIT:
        assert isinstance(op, Read | Write)
        file = k.vmas[op.vma].file
        return frozenset(
            t
            for t, p in k.programs.items()
            if any(isinstance(o, Punch) and o.file == file for o in p)
        )
    if isinstance(op, Punch) and ts.pc == _Pc.ACCESS and world.punching(op.file) is not None:
        return frozenset(
            t
            for t, p in k.programs.items()
            if t != name and any(isinstance(o, Punch) and o.file == op.file for o in p)
        )
    holder = lock_holder(k, world, name, ts, op)
    if holder is not None:
        return frozenset({holder}) & set(k.programs) - {name}
    if isinstance(op, Serve) and ts.event is None and not world.queue:
        return frozenset(
            t
            for t, p in k.programs.items()
            if any(
                isinstance(o, Read | Write) and _may_userfault(k, o)
                for o in p[world.thread(t).op :]
            )
        )
    return None


def lock_holder(k: Kernel, world: _World, name: str, ts: _ThreadState, op: Op) -> str | None:
    """The holder of the page lock ``name`` waits for, if it waits for one."""
    frame: _Frame | None = None
    if ts.pc == _Pc.LOCK_PAGE and ts.page is not None:
        frame = world.frame(ts.page)
    elif ts.pc == _Pc.TRUNCATE and isinstance(op, Punch):
        for fi in range(ts.cursor, op.start + op.pages):
            fid = world.cached(op.file, fi)
            if fid is not None:
                frame = world.frame(fid)
                break
    elif ts.pc == _Pc.CONTINUE and ts.event is not None:
        v = k.vmas[ts.event.vma]
        fid = world.cached(v.file, v.pgoff + ts.event.index)
        frame = None if fid is None else world.frame(fid)
    if frame is None or frame.locked is None or frame.locked == name:
        return None
    return frame.locked


def _punch_future(
    k: Kernel, world: _World, op: Punch, ts: _ThreadState | None, writes: set[Hashable]
) -> None:
    # ts: where the punch is, if it is the op under way (its done steps touch nothing more).
    pc = _Pc.ACCESS if ts is None else ts.pc
    end = op.start + op.pages
    mapping = victims(k, op)
    writes.update((("inode", op.file), ("fwait", op.file)))
    writes.update(("falloc", op.file, fi) for fi in range(op.start, end))
    writes.update(("thread", t) for t, s in world.threads() if s.pc == _Pc.FALLOC_WAIT)
    if pc == _Pc.END:
        return
    first = ts.cursor if ts is not None and pc in (_Pc.TRUNCATE, _Pc.REMOVE) else op.start
    for fi in range(first, end):
        writes.update((("cache", op.file, fi), ("page", fi)))
    unmapping = mapping[ts.cursor :] if ts is not None and pc == _Pc.UNMAP else mapping
    for v in mapping:
        lo = op.start if v in unmapping and pc in (_Pc.ACCESS, _Pc.UNMAP) else first
        for fi in range(max(lo, v.pgoff), min(end, v.pgoff + v.pages)):
            writes.add(("pte", v.id, fi - v.pgoff))


def _punched(k: Kernel, file: int, index: int) -> bool:
    """Some thread's program punches file page ``index``."""
    return any(
        isinstance(op, Punch) and op.file == file and op.start <= index < op.start + op.pages
        for p in k.programs.values()
        for op in p
    )


def _may_userfault(k: Kernel, op: Read | Write) -> bool:
    register = k.vmas[op.vma].register
    if isinstance(op, Read):
        return bool(register & (_Mode.MISSING | _Mode.MINOR))
    return bool(register)


def _access_future(
    k: Kernel, op: Read | Write, reads: set[Hashable], writes: set[Hashable]
) -> None:
    v = k.vmas[op.vma]
    fi = v.pgoff + op.index
    writes.update((("pte", v.id, op.index), ("cache", v.file, fi), ("page", fi), ("alloc",)))
    # shmem_fault() reads inode->i_private, and writes it only to sleep on a punch.
    reads.add(("falloc", v.file, fi))
    if _punched(k, v.file, fi):
        writes.add(("fwait", v.file))
    if _may_userfault(k, op):
        writes.update((("uffd",), ("waiters", v.id, op.index)))
    if isinstance(op, Read) and k.should_fault_around(v):
        for j in k.fault_around_window(v, op.index):
            writes.add(("pte", v.id, j))
            reads.update((("cache", v.file, v.pgoff + j), ("page", v.pgoff + j)))

"""What a thread may still touch, and who could let it move: the explorer's persistent sets.

``future`` over-approximates, from a thread's remaining program (and, from the World, only who
is asleep and what is queued), the footprint of any number of its own steps; ``enablers`` names
who could let a thread move that cannot; ``abstract`` puts a step's footprint in the same
vocabulary, where a frame is its file page (:class:`._footprint.Page`), since which frame a
future step meets is not known yet. Keys are the records of :mod:`._footprint`, the ones Step
notes. They read the World without noting it: they are not steps.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from .._flags import Mode as _Mode
from . import _footprint as fp
from ._config import Config
from ._ops import CopyPages, Op, Protect, Punch, Read, Serve, Write, WriteBack, WriteProtect
from ._punch import victims
from ._state import Frame as _Frame
from ._state import Pc as _Pc
from ._state import ThreadState as _ThreadState
from ._state import World as _World

__all__ = ["abstract", "enablers", "future"]


def future(
    cfg: Config, world: _World, name: str, frozen: frozenset[str]
) -> tuple[frozenset[fp.Key], frozenset[fp.Key]]:
    """(reads, writes) that thread ``name`` may touch in any number of its own steps from
    ``world``, while the threads in ``frozen`` stay where they are.

    It is built from the thread's remaining program, not from the World, except for what
    only the present can say: which threads are asleep (only those can be woken by someone
    else: an awake thread in ``frozen`` stays awake), the messages already queued, and who
    could still queue one. A thread asleep whose every waker is frozen takes no step at all.
    """
    ts = world.thread(name)
    program = cfg.programs[name]
    empty: frozenset[fp.Key] = frozenset()
    stalled = enablers(cfg, world, name)
    if stalled is not None and stalled <= frozen:
        return empty, empty
    reads: set[fp.Key] = set()
    writes: set[fp.Key] = {fp.Thread(name)}
    asleep = [fp.Thread(t) for t, s in world.threads() if s.pc == _Pc.USERFAULT]
    for op in program[ts.op :]:
        current = ts if op is program[ts.op] else None
        if isinstance(op, Read | Write):
            _access_future(cfg, op, reads, writes)
        elif isinstance(op, Punch):
            _punch_future(cfg, world, op, current, writes)
        elif isinstance(op, Protect):
            v = cfg.vmas[op.vma]
            writes.add(fp.Log(fp.Record.IMAGE))
            for i in range(v.pages):
                writes.add(fp.Pte(v.id, i))
                reads.update((fp.Cache(v.file, v.pgoff + i), fp.Page(v.pgoff + i)))
        elif isinstance(op, CopyPages):
            v = cfg.vmas[op.vma]
            first = ts.cursor if current is not None else 0
            for i in range(first, v.pages):
                writes.update((fp.Snap(v.id, i), fp.Pte(v.id, i), fp.Waiters(v.id, i)))
                reads.update((fp.Cache(v.file, v.pgoff + i), fp.Page(v.pgoff + i)))
            writes.update(asleep)
        elif isinstance(op, WriteProtect):
            writes.add(fp.Pte(op.vma, op.index))
        elif isinstance(op, WriteBack):
            v = cfg.vmas[op.vma]
            fi = v.pgoff + op.index
            reads.update((fp.Cache(v.file, fi), fp.Page(fi)))
            writes.update((fp.Log(fp.Record.DIRTY), fp.Log(fp.Record.STORE)))
        else:
            _serve_future(cfg, world, name, ts, op, frozen, writes)
            if op.pager:  # fills from the store, notes pages dirty and clean
                reads.add(fp.Log(fp.Record.STORE))
                writes.add(fp.Log(fp.Record.DIRTY))
            writes.update(asleep)
    reads |= writes
    return frozenset(reads), frozenset(writes)


def _serve_future(
    cfg: Config,
    world: _World,
    name: str,
    ts: _ThreadState,
    op: Serve,
    frozen: frozenset[str],
    writes: set[fp.Key],
) -> None:
    writes.update(
        (
            fp.UFFD,
            fp.Log(fp.Record.NOTIFIED),
            fp.Log(fp.Record.RESOLVED),
            fp.Log(fp.Record.SAVED),
        )
    )
    pages = {(e.vma, e.index) for e in world.queue}
    if ts.event is not None:
        pages.add((ts.event.vma, ts.event.index))
    for t, prog in cfg.programs.items():
        if t in frozen or t == name:
            continue
        for later in prog[world.thread(t).op :]:
            if isinstance(later, Read | Write) and _may_userfault(cfg, later):
                pages.add((later.vma, later.index))
    if op.prefetch:
        pages |= {
            (vid, j)
            for vid, i in pages
            for j in range(i + 1, min(i + 1 + op.prefetch, cfg.vmas[vid].pages))
        }
    for vid, i in pages:
        v = cfg.vmas[vid]
        fi = v.pgoff + i
        writes.update(
            (
                fp.Pte(vid, i),
                fp.Cache(v.file, fi),
                fp.Page(fi),
                fp.ALLOC,
                fp.Waiters(vid, i),
                fp.Snap(vid, i),
            )
        )


def enablers(cfg: Config, world: _World, name: str) -> frozenset[str] | None:
    """If thread ``name`` cannot move in ``world``, every thread whose step could let it
    (empty: it never moves again); None if it can move now.

    Only a server wakes a userfault, only a punch of the file wakes shmem_falloc_wait,
    only the holder unlocks a page, and only a fault queues a message for an idle server.
    """
    ts = world.thread(name)
    program = cfg.programs[name]
    if ts.op >= len(program):
        return frozenset()
    op = program[ts.op]
    if ts.pc == _Pc.USERFAULT:
        # A message's ioctl wakes it, and so does the snapshot copier's unprotect.
        return frozenset(
            t for t, p in cfg.programs.items() if any(isinstance(o, Serve | CopyPages) for o in p)
        )
    if ts.pc == _Pc.FALLOC_WAIT:
        assert isinstance(op, Read | Write)
        file = cfg.vmas[op.vma].file
        return frozenset(
            t
            for t, p in cfg.programs.items()
            if any(isinstance(o, Punch) and o.file == file for o in p)
        )
    if isinstance(op, Punch) and ts.pc == _Pc.ACCESS and world.punching(op.file) is not None:
        return frozenset(
            t
            for t, p in cfg.programs.items()
            if t != name and any(isinstance(o, Punch) and o.file == op.file for o in p)
        )
    holder = lock_holder(cfg, world, name, ts, op)
    if holder is not None:
        return frozenset({holder}) & set(cfg.programs) - {name}
    if isinstance(op, Serve) and ts.event is None and not world.queue:
        return frozenset(
            t
            for t, p in cfg.programs.items()
            if any(
                isinstance(o, Read | Write) and _may_userfault(cfg, o)
                for o in p[world.thread(t).op :]
            )
        )
    return None


def lock_holder(cfg: Config, world: _World, name: str, ts: _ThreadState, op: Op) -> str | None:
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
        v = cfg.vmas[ts.event.vma]
        fid = world.cached(v.file, v.pgoff + ts.event.index)
        frame = None if fid is None else world.frame(fid)
    if frame is None or frame.locked is None or frame.locked == name:
        return None
    return frame.locked


def _punch_future(
    cfg: Config, world: _World, op: Punch, ts: _ThreadState | None, writes: set[fp.Key]
) -> None:
    # ts: where the punch is, if it is the op under way (its done steps touch nothing more).
    pc = _Pc.ACCESS if ts is None else ts.pc
    end = op.start + op.pages
    mapping = victims(cfg, op)
    writes.update((fp.Inode(op.file), fp.FallocWait(op.file)))
    writes.update(fp.Falloc(op.file, fi) for fi in range(op.start, end))
    writes.update(fp.Thread(t) for t, s in world.threads() if s.pc == _Pc.FALLOC_WAIT)
    if pc == _Pc.END:
        return
    first = ts.cursor if ts is not None and pc in (_Pc.TRUNCATE, _Pc.REMOVE) else op.start
    for fi in range(first, end):
        writes.update((fp.Cache(op.file, fi), fp.Page(fi)))
    unmapping = mapping[ts.cursor :] if ts is not None and pc == _Pc.UNMAP else mapping
    for v in mapping:
        lo = op.start if v in unmapping and pc in (_Pc.ACCESS, _Pc.UNMAP) else first
        for fi in range(max(lo, v.pgoff), min(end, v.pgoff + v.pages)):
            writes.add(fp.Pte(v.id, fi - v.pgoff))


def _punched(cfg: Config, file: int, index: int) -> bool:
    """Some thread's program punches file page ``index``."""
    return any(
        isinstance(op, Punch) and op.file == file and op.start <= index < op.start + op.pages
        for p in cfg.programs.values()
        for op in p
    )


def _may_userfault(cfg: Config, op: Read | Write) -> bool:
    register = cfg.vmas[op.vma].register
    if isinstance(op, Read):
        return bool(register & (_Mode.MISSING | _Mode.MINOR))
    return bool(register)


def _access_future(cfg: Config, op: Read | Write, reads: set[fp.Key], writes: set[fp.Key]) -> None:
    v = cfg.vmas[op.vma]
    fi = v.pgoff + op.index
    writes.update((fp.Pte(v.id, op.index), fp.Cache(v.file, fi), fp.Page(fi), fp.ALLOC))
    # shmem_fault() reads inode->i_private, and writes it only to sleep on a punch.
    reads.add(fp.Falloc(v.file, fi))
    if _punched(cfg, v.file, fi):
        writes.add(fp.FallocWait(v.file))
    if _may_userfault(cfg, op):
        writes.update((fp.UFFD, fp.Waiters(v.id, op.index)))
    if isinstance(op, Read) and cfg.should_fault_around(v):
        for j in cfg.fault_around_window(v, op.index):
            writes.add(fp.Pte(v.id, j))
            reads.update((fp.Cache(v.file, v.pgoff + j), fp.Page(v.pgoff + j)))


def abstract(world: _World, keys: Iterable[Hashable]) -> frozenset[fp.Key]:
    """A step's footprint in the vocabulary of ``future``: a frame (its record or a change of
    its contents) becomes its file page, since which frame a future step meets is not known
    yet; ``world`` is the World after the step (it knows every frame the step touched)."""
    out: set[fp.Key] = set()
    for key in keys:
        if isinstance(key, fp.Frame | fp.Data):
            out.add(fp.Page(world.frame(key.frame).index))
        else:
            assert isinstance(key, fp.Key), key  # what Step notes, nothing else
            out.add(key)
    return frozenset(out)

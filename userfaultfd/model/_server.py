"""The userfaultfd server side: read a message and resolve it, and the live snapshot's threads.

A server (:class:`._ops.Serve`) reads one message a step, then resolves it in the steps its mode
takes: UFFDIO_COPY (and the prefetch pages after it, one a step), update + UFFDIO_CONTINUE, or
save + UFFDIO_WRITEPROTECT(0), or the pager's fill (UFFDIO_COPY(MODE_WP) from its store) and
mark-dirty + UFFDIO_WRITEPROTECT(0); each ioctl wakes the threads asleep on the page. The live
snapshot's protect instant (:class:`._ops.Protect`) and background copy (:class:`._ops.CopyPages`)
are here too, and the pager's eviction steps before its punch (:class:`._ops.WriteProtect`,
:class:`._ops.WriteBack`). Plain functions of the frozen configuration, the Step under way and
the thread, as in :mod:`._fault`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .._flags import Mode as _Mode
from ._config import Config
from ._fault import pages_text, wake
from ._ops import CopyPages, Label, Protect, Serve, Vma, WriteBack, WriteProtect
from ._state import MARKER as _MARKER
from ._state import Event as _Event
from ._state import Frame as _Frame
from ._state import Marker as _Marker
from ._state import Pc as _Pc
from ._state import Present as _Present
from ._state import Step as _Step
from ._state import ThreadState as _ThreadState
from ._state import store_text

__all__ = [
    "copy_page",
    "copy_pages",
    "protect",
    "serve",
    "unprotect",
    "write_back",
    "write_protect",
]


def serve(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label | None:
    """The next step of a server; None while no message is queued or a page lock holds it."""
    if ts.event is None:
        return _read_message(cfg, w, name, ts, op)
    return _RESOLVE[ts.pc](cfg, w, name, ts, op)


def _read_message(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label | None:
    ev = w.pop_event()
    if ev is None:
        return None
    w.add_notified(ev.mode, ev.vma, ev.index)
    wp = _Pc.SAVE if op.snapshot else _Pc.DIRTY if op.pager else _Pc.SNAPSHOT
    missing = _Pc.FILL if op.pager else _Pc.COPY
    pc = {_Mode.MISSING: missing, _Mode.MINOR: _Pc.UPDATE, _Mode.WP: wp}[ev.mode]
    w.set_thread(name, replace(ts, pc=pc, event=ev))
    assert ev.mode.name is not None
    return Label("read(uffd)", f"{ev.mode.name} message: VMA {ev.vma} page {ev.index}")


def _held(cfg: Config, ts: _ThreadState) -> tuple[_Event, Vma]:
    """The message the server is resolving, and the VMA it is about."""
    assert ts.event is not None
    return ts.event, cfg.vmas[ts.event.vma]


def _idle(ts: _ThreadState) -> _ThreadState:
    """The server after a message: waiting for the next one."""
    return _ThreadState(op=ts.op, pc=_Pc.WAIT, faults=ts.faults)


def _copy(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    ev, vma = _held(cfg, ts)
    result = copy_page(w, vma, ev.index)
    woken = wake(w, ev.vma, ev.index)
    last = min(ev.index + 1 + op.prefetch, vma.pages)
    more = ev.index + 1 < last
    w.set_thread(name, replace(ts, pc=_Pc.PREFETCH, cursor=ev.index + 1) if more else _idle(ts))
    return Label("UFFDIO_COPY", f"page {ev.index}: {result}; woke {pages_text(woken)}")


def _prefetch(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    ev, vma = _held(cfg, ts)
    i = ts.cursor
    result = copy_page(w, vma, i)
    if result == "EEXIST":
        result = "already there: the copy stops (done), resume after it"
    woken = wake(w, ev.vma, i)
    last = min(ev.index + 1 + op.prefetch, vma.pages)
    w.set_thread(name, replace(ts, cursor=i + 1) if i + 1 < last else _idle(ts))
    return Label("UFFDIO_COPY", f"prefetch page {i}: {result}; woke {pages_text(woken)}")


def _update(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    ev, vma = _held(cfg, ts)
    fi = vma.pgoff + ev.index
    fid = w.cached(vma.file, fi)
    if fid is not None:
        w.set_frame(fid, replace(w.frame(fid), data=f"u{fi}"))
    w.set_thread(name, replace(ts, pc=_Pc.CONTINUE))
    what = f"frame #{fid} <- {'u' + str(fi)!r}" if fid is not None else "page is gone"
    return Label("server", f"update file page {fi} through its own mapping: {what}")


def _continue(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label | None:
    ev, vma = _held(cfg, ts)
    # UFFDIO_CONTINUE -> mfill_atomic_pte_continue(): the cached page, locked, mapped.
    fid = w.cached(vma.file, vma.pgoff + ev.index)
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
    w.add_resolved(ev.vma, ev.index)
    woken = wake(w, ev.vma, ev.index)
    w.set_thread(name, _idle(ts))
    return Label("UFFDIO_CONTINUE", f"page {ev.index}: {result}; woke {pages_text(woken)}")


def _snapshot(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    ev = ts.event
    assert ev is not None and ev.frame is not None
    data = w.frame(ev.frame).data
    w.add_saved(ev.frame)
    w.set_thread(name, replace(ts, pc=_Pc.UNPROTECT))
    return Label("server", f"saved frame #{ev.frame} ({data!r}) to the snapshot")


def _save(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    # The live snapshot's fault thread: the page as the writer found it, unless the
    # copier saved it first.
    ev = ts.event
    assert ev is not None and ev.frame is not None
    w.set_thread(name, replace(ts, pc=_Pc.UNPROTECT))
    if w.snapped(ev.vma, ev.index) is not None:
        return Label("snapshot", f"page {ev.index} already saved by the copier")
    data = w.frame(ev.frame).data
    w.set_snapped(ev.vma, ev.index, (ev.frame, data))
    return Label("snapshot", f"saved page {ev.index}: frame #{ev.frame} ({data!r})")


def _unprotect_message(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    ev, vma = _held(cfg, ts)
    result, woken = unprotect(w, vma, ev.index)
    w.set_thread(name, _idle(ts))
    return Label("UFFDIO_WRITEPROTECT", f"page {ev.index}: {result}; woke {pages_text(woken)}")


def _fill(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    # The pager's fill: UFFDIO_COPY(MODE_WP) of what its store holds; the page is clean.
    ev, vma = _held(cfg, ts)
    result = copy_page(w, vma, ev.index, wp=True)
    if result != "EEXIST":
        w.set_dirty(vma.file, vma.pgoff + ev.index, False)
    woken = wake(w, ev.vma, ev.index)
    w.set_thread(name, _idle(ts))
    return Label("UFFDIO_COPY", f"page {ev.index} (MODE_WP): {result}; woke {pages_text(woken)}")


def _dirty(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Serve) -> Label:
    # The pager's WP fault: note the page dirty first, then let the write through.
    ev, vma = _held(cfg, ts)
    w.set_dirty(vma.file, vma.pgoff + ev.index, True)
    result, woken = unprotect(w, vma, ev.index)
    w.set_thread(name, _idle(ts))
    return Label(
        "UFFDIO_WRITEPROTECT",
        f"page {ev.index} marked dirty, then unprotected: {result}; woke {pages_text(woken)}",
    )


def copy_page(w: _Step, vma: Vma, i: int, *, wp: bool = False) -> str:
    """UFFDIO_COPY into page ``i`` of ``vma`` (see :meth:`._kernel.Kernel.copy`)."""
    # UFFDIO_COPY -> shmem_mfill_atomic_pte(): fails with EEXIST if the page is there.
    fi = vma.pgoff + i
    fid = w.cached(vma.file, fi) if vma.shared else None
    pte = w.pte(vma.id, i)
    if fid is not None or isinstance(pte, _Present):
        return "EEXIST"
    origin = "copy" if vma.shared else "cow"
    data = w.stored(vma.file, fi) if wp else store_text(fi)
    fid = w.new_frame(_Frame(data, None, True, fi, origin, vma.id))
    if vma.shared:
        w.set_cached(vma.file, fi, fid)
    # mfill_atomic_install_pte(): MODE_WP installs the PTE read-only with uffd-wp.
    w.set_pte(vma.id, i, _Present(fid, writable=not wp, uffd_wp=wp))
    how = "mapped write-protected" if wp else "mapped"
    return f"new frame #{fid} ({data!r}) cached and {how}"


def unprotect(w: _Step, vma: Vma, i: int) -> tuple[str, list[str]]:
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
    return result, wake(w, vma.id, i)


#: The rule each program counter of a server holding a message runs.
_RESOLVE: dict[_Pc, Callable[[Config, _Step, str, _ThreadState, Serve], Label | None]] = {
    _Pc.COPY: _copy,
    _Pc.PREFETCH: _prefetch,
    _Pc.UPDATE: _update,
    _Pc.CONTINUE: _continue,
    _Pc.SNAPSHOT: _snapshot,
    _Pc.SAVE: _save,
    _Pc.UNPROTECT: _unprotect_message,
    _Pc.FILL: _fill,
    _Pc.DIRTY: _dirty,
}


# -- the live snapshot's protect instant and background copy ------------------------------------
def _page_now(w: _Step, vma: Vma, i: int) -> tuple[int | None, str]:
    """What reading page ``i`` finds: the cached frame and its contents, or zeros."""
    fid = w.cached(vma.file, vma.pgoff + i)
    return (None, "0") if fid is None else (fid, w.frame(fid).data)


def protect(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Protect) -> Label:
    """The protect instant: write-protect every page of the VMA and note what each held."""
    vma = cfg.vmas[op.vma]
    marked = []
    for i in range(vma.pages):
        pte = w.pte(vma.id, i)
        if isinstance(pte, _Present):
            w.set_pte(vma.id, i, _Present(pte.frame, writable=False, uffd_wp=True))
        elif pte is None and cfg.preset.pte_markers:
            w.set_pte(vma.id, i, _MARKER)
            marked.append(i)
        w.set_image(vma.id, i, _page_now(w, vma, i))
    w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
    how = f"; markers on unmapped pages {pages_text(marked)}" if marked else ""
    return Label("UFFDIO_WRITEPROTECT", f"protect instant: pages 0-{vma.pages - 1}{how}")


def copy_pages(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: CopyPages) -> Label:
    """The background copy's next step: save the next page not saved yet, then unprotect it."""
    vma = cfg.vmas[op.vma]
    if ts.pc == _Pc.UNPROTECT:
        result, woken = unprotect(w, vma, ts.cursor)
        w.set_thread(name, replace(ts, pc=_Pc.ACCESS, cursor=ts.cursor + 1))
        return Label("UFFDIO_WRITEPROTECT", f"page {ts.cursor}: {result}; woke {pages_text(woken)}")
    for i in range(ts.cursor, vma.pages):
        if w.snapped(vma.id, i) is not None:
            continue
        fid, data = _page_now(w, vma, i)
        w.set_snapped(vma.id, i, (fid, data))
        w.set_thread(name, replace(ts, pc=_Pc.UNPROTECT, cursor=i))
        where = "zeros (no page)" if fid is None else f"frame #{fid}"
        return Label("copy", f"saved page {i}: {where} ({data!r})")
    w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
    return Label("copy", "every page saved: snapshot complete")


# -- the pager's eviction: protect, write back if dirty (then the punch, a Punch op) -----------
def write_protect(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: WriteProtect) -> Label:
    """UFFDIO_WRITEPROTECT of one page: uffd-wp on a present PTE, a marker on a none PTE only
    with PTE markers (change_pte_range()); no wake."""
    vma = cfg.vmas[op.vma]
    pte = w.pte(vma.id, op.index)
    if isinstance(pte, _Present):
        w.set_pte(vma.id, op.index, _Present(pte.frame, writable=False, uffd_wp=True))
        result = f"frame #{pte.frame} protected"
    elif pte is None and cfg.preset.pte_markers:
        w.set_pte(vma.id, op.index, _MARKER)
        result = "marker on the none PTE"
    else:
        result = "nothing mapped: nothing protected" if pte is None else "marker already there"
    w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
    return Label("UFFDIO_WRITEPROTECT", f"evict page {op.index}: {result}")


def write_back(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: WriteBack) -> Label:
    """The pager writes a dirty page back to its store (through its own mapping of the file:
    the page cache's frame, no lock taken) and marks it clean."""
    vma = cfg.vmas[op.vma]
    fi = vma.pgoff + op.index
    w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
    if not w.is_dirty(vma.file, fi):
        return Label("write back", f"page {op.index} is clean: nothing to write")
    fid = w.cached(vma.file, fi)
    if fid is None:
        return Label("write back", f"page {op.index} is dirty but not in the page cache")
    data = w.frame(fid).data
    w.set_stored(vma.file, fi, data)
    w.set_dirty(vma.file, fi, False)
    return Label("write back", f"page {op.index}: frame #{fid} ({data!r}) to the store; clean")

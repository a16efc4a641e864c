"""The fault path of a Read or Write: the CPU's access, then one kernel step a call.

Each rule is a plain function of the kernel's frozen configuration (:class:`._config.Config`:
VMAs, files, programs, preset, the fault-around window), the :class:`._state.Step` under way
(the World being changed, which notes the step's footprint), and the thread: a step's inputs are
all in its signature, and :data:`STEPS` maps a thread's program counter to the rule it runs next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from .._flags import Mode as _Mode
from ._config import Config
from ._ops import Label, Read, Vma, Write
from ._state import ASLEEP as _ASLEEP
from ._state import Event as _Event
from ._state import Frame as _Frame
from ._state import Marker as _Marker
from ._state import Pc as _Pc
from ._state import Present as _Present
from ._state import Step as _Step
from ._state import ThreadState as _ThreadState
from ._state import World as _World

__all__ = ["STEPS", "access", "in_hole", "pages_text", "userfault", "wake"]


def pages_text(indexes: Iterable[object]) -> str:
    """Page numbers for a label: ``1, 3`` or ``none``."""
    out = ", ".join(str(i) for i in indexes)
    return out or "none"


def in_hole(world: _World, vma: Vma, index: int) -> bool:
    # For labels only (given the World before the step: the rule itself does not look).
    span = world.punching(vma.file)
    return span is not None and span[0] <= vma.pgoff + index < span[1]


def access(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label | None:
    """The next step of a Read or Write; None while the thread sleeps or waits for a lock."""
    rule = STEPS.get(ts.pc)
    if rule is None:
        assert ts.pc in _ASLEEP, ts.pc
        return None
    return rule(cfg, w, name, ts, op)


def _hw_access(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma = cfg.vmas[op.vma]
    i = op.index
    write = isinstance(op, Write)
    pte = w.pte(vma.id, i)
    if isinstance(pte, _Present):
        frame = w.frame(pte.frame)
        if isinstance(op, Read):
            w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults, value=frame.data))
            w.loaded(name)
            return Label("load", f"page {i} reads {frame.data!r} (frame #{pte.frame})")
        if pte.writable:
            w.set_frame(pte.frame, replace(frame, data=op.data))
            w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
            change = f"page {i}: frame #{pte.frame} {frame.data!r} -> {op.data!r}"
            if in_hole(w.before, vma, i) and w.before.cached(vma.file, vma.pgoff + i) == pte.frame:
                change += " (a frame the punch in progress will drop)"
            return Label("store", change)
        w.set_thread(name, replace(ts, pc=_Pc.WP_PAGE, orig=pte, faults=ts.faults + 1))
        protection = "uffd-wp" if pte.uffd_wp else "read-only"
        return Label("handle_mm_fault", f"write fault on {protection} page {i}: do_wp_page")
    kind = "none" if pte is None else "uffd-wp marker"
    if not write and cfg.should_fault_around(vma):
        nxt, how = _Pc.FAULT_AROUND, "do_read_fault -> do_fault_around"
    else:
        nxt = _Pc.SHMEM_FAULT
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


def _fault_around(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma, i = cfg.vmas[op.vma], op.index
    window = cfg.fault_around_window(vma, i)
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
    w.set_thread(name, replace(ts, pc=_Pc.ACCESS if hit else _Pc.SHMEM_FAULT))
    change = f"window pages {window.start}-{window.stop - 1}: mapped {pages_text(mapped)} read-only"
    doomed = [vi for vi in mapped if in_hole(w.before, vma, vi)]
    if doomed:
        change += f" (page {pages_text(doomed)} inside the hole being punched: not checked here)"
    if skipped:
        change += f"; skipped {', '.join(skipped)}"
    change += "; fault done (VM_FAULT_NOPAGE)" if hit else "; faulting page not mapped: __do_fault"
    return Label("do_fault_around", change)


def _shmem_fault(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma = cfg.vmas[op.vma]
    fi = vma.pgoff + op.index
    span = w.hole(vma.file, fi)
    if span is not None:
        w.set_falloc_sleepers(vma.file, w.falloc_sleepers(vma.file) | {name})
        w.set_thread(name, replace(ts, pc=_Pc.FALLOC_WAIT))
        return Label(
            "shmem_fault",
            f"file page {fi} is in the hole [{span[0]}, {span[1]}) being punched: "
            "shmem_falloc_wait sleeps",
        )
    w.set_thread(name, replace(ts, pc=_Pc.GET_FOLIO))
    return Label("shmem_fault", f"no hole punch covers file page {fi}: shmem_get_folio")


def _get_folio(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma, i = cfg.vmas[op.vma], op.index
    fi = vma.pgoff + i
    if fi >= cfg.files[vma.file].pages:
        w.set_thread(name, _ThreadState(op=ts.op + 1, pc=_Pc.SIGBUS, faults=ts.faults))
        return Label("shmem_fault", f"file page {fi} is beyond i_size: SIGBUS")
    fid = w.cached(vma.file, fi)
    if fid is not None and vma.register & _Mode.MINOR:
        return userfault(w, name, ts, vma, i, _Mode.MINOR)
    if fid is None and vma.register & _Mode.MISSING:
        return userfault(w, name, ts, vma, i, _Mode.MISSING)
    if fid is None:
        # shmem_alloc_and_add_folio(): a new zeroed folio, locked, added to the cache.
        fid = w.new_frame(_Frame("0", name, True, fi, "fault", vma.id))
        w.set_cached(vma.file, fi, fid)
        w.set_thread(name, replace(ts, pc=_Pc.FINISH_FAULT, page=fid))
        return Label("shmem_get_folio", f"file page {fi} absent: new zero frame #{fid}, locked")
    w.set_thread(name, replace(ts, pc=_Pc.LOCK_PAGE, page=fid))
    return Label("shmem_get_folio", f"file page {fi} is frame #{fid} in the cache: lock it")


def _lock_page(
    cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write
) -> Label | None:
    assert ts.page is not None
    frame = w.frame(ts.page)
    if frame.locked is not None:
        return None
    vma = cfg.vmas[op.vma]
    if w.cached(vma.file, vma.pgoff + op.index) != ts.page:
        w.set_thread(name, replace(ts, pc=_Pc.GET_FOLIO, page=None))
        return Label(
            "shmem_get_folio", f"frame #{ts.page} was truncated meanwhile: repeat the lookup"
        )
    w.set_frame(ts.page, replace(frame, locked=name))
    w.set_thread(name, replace(ts, pc=_Pc.FINISH_FAULT))
    return Label("folio_lock", f"locked frame #{ts.page}")


def _finish_fault(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma, i = cfg.vmas[op.vma], op.index
    write = isinstance(op, Write)
    fid = ts.page
    assert fid is not None
    frame = w.frame(fid)
    pte = w.pte(vma.id, i)
    # The fault holds the page lock from shmem_get_folio() to here; unlock it in this step.
    w.set_frame(fid, replace(frame, locked=None))
    w.set_thread(name, replace(ts, pc=_Pc.ACCESS, page=None, orig=None))
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


def _wp_page(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Read | Write) -> Label:
    vma, i = cfg.vmas[op.vma], op.index
    pte = w.pte(vma.id, i)
    if pte != ts.orig or not isinstance(pte, _Present):
        w.set_thread(name, replace(ts, pc=_Pc.ACCESS, orig=None))
        return Label("do_wp_page", f"PTE of page {i} changed meanwhile: retry")
    if pte.uffd_wp and vma.register & _Mode.WP:
        return userfault(w, name, ts, vma, i, _Mode.WP, pte.frame)
    w.set_thread(name, replace(ts, pc=_Pc.ACCESS, orig=None))
    if vma.shared or w.frame(pte.frame).anon:
        w.set_pte(vma.id, i, _Present(pte.frame, writable=True, uffd_wp=False))
        return Label("wp_page_reuse", f"page {i}: frame #{pte.frame} made writable")
    src = w.frame(pte.frame)
    copy = w.new_frame(_Frame(src.data, None, True, src.index, "cow", vma.id))
    w.set_pte(vma.id, i, _Present(copy, writable=True, uffd_wp=False))
    return Label("wp_page_copy", f"page {i}: private copy #{copy} of frame #{pte.frame}")


def userfault(
    w: _Step,
    name: str,
    ts: _ThreadState,
    vma: Vma,
    i: int,
    mode: _Mode,
    frame: int | None = None,
) -> Label:
    """handle_userfault(): queue a ``mode`` message for page ``i`` and put the thread to sleep."""
    assert mode.name is not None
    w.push_event(_Event(mode, vma.id, i, name, frame))
    w.set_sleepers(vma.id, i, w.sleepers(vma.id, i) | {name})
    w.set_thread(name, replace(ts, pc=_Pc.USERFAULT, page=None, orig=None))
    return Label("handle_userfault", f"{mode.name} message for page {i} queued; thread sleeps")


def wake(w: _Step, vma: int, index: int) -> list[str]:
    """Wake the threads asleep on page ``index`` of ``vma``: each retries its access."""
    woken = sorted(w.sleepers(vma, index))
    w.set_sleepers(vma, index, frozenset())
    for t in woken:
        w.set_thread(t, replace(w.thread(t), pc=_Pc.ACCESS, page=None, orig=None))
    return woken


#: The rule each program counter of the fault path runs (the sleeping ones have none).
STEPS: dict[_Pc, Callable[[Config, _Step, str, _ThreadState, Read | Write], Label | None]] = {
    _Pc.ACCESS: _hw_access,
    _Pc.FAULT_AROUND: _fault_around,
    _Pc.SHMEM_FAULT: _shmem_fault,
    _Pc.GET_FOLIO: _get_folio,
    _Pc.LOCK_PAGE: _lock_page,
    _Pc.FINISH_FAULT: _finish_fault,
    _Pc.WP_PAGE: _wp_page,
}

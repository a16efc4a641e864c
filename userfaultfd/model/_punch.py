"""Hole punching: shmem_fallocate(FALLOC_FL_PUNCH_HOLE), one critical section a step.

publish (take inode_lock, set inode->i_private), unmap one VMA a step, then per page of the hole
truncate (lock it) and remove (unmap it if still mapped, drop it from the cache, unlock), and end
(clear i_private, wake the faults asleep in shmem_falloc_wait()). Plain functions of the frozen
configuration, the Step under way and the thread, as in :mod:`._fault`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .._flags import Mode as _Mode
from ._config import Config
from ._ops import Label, Punch, Vma
from ._state import MARKER as _MARKER
from ._state import Marker as _Marker
from ._state import Pc as _Pc
from ._state import Present as _Present
from ._state import Step as _Step
from ._state import ThreadState as _ThreadState

__all__ = ["STEPS", "punch", "victims"]


def victims(cfg: Config, op: Punch) -> list[Vma]:
    """The VMAs that map some page of the hole."""
    end = op.start + op.pages
    return [
        v for v in cfg.vmas if v.file == op.file and v.pgoff < end and op.start < v.pgoff + v.pages
    ]


def punch(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label | None:
    """The next step of a hole punch; None while another punch of the file or a page lock holds
    it back."""
    return STEPS[ts.pc](cfg, w, name, ts, op)


def _publish(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label | None:
    start, end = op.start, op.start + op.pages
    # shmem_fallocate() holds inode_lock from here to the end: punches of one file
    # run one after the other (i_private is set exactly while one is in progress).
    if w.punching(op.file) is not None:
        return None
    w.set_punching(op.file, (start, end))
    nxt = (
        replace(ts, pc=_Pc.UNMAP, cursor=0)
        if victims(cfg, op)
        else replace(ts, pc=_Pc.TRUNCATE, cursor=start)
    )
    w.set_thread(name, nxt)
    return Label("shmem_fallocate", f"inode->i_private = hole [{start}, {end})")


def _unmap(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label:
    start, end = op.start, op.start + op.pages
    mapping = victims(cfg, op)
    vma = mapping[ts.cursor]
    changes = []
    for fi in range(max(start, vma.pgoff), min(end, vma.pgoff + vma.pages)):
        vi = fi - vma.pgoff
        pte = w.pte(vma.id, vi)
        # even_cows=0: private COW copies stay mapped.
        if not isinstance(pte, _Present) or w.frame(pte.frame).anon:
            continue
        keep = cfg.preset.pte_markers and pte.uffd_wp and bool(vma.register & _Mode.WP)
        w.set_pte(vma.id, vi, _MARKER if keep else None)
        if keep:
            changes.append(f"page {vi} zapped, uffd-wp marker left")
        elif pte.uffd_wp:
            changes.append(f"page {vi} zapped, its uffd-wp bit lost")
        else:
            changes.append(f"page {vi} zapped")
    last = ts.cursor + 1 == len(mapping)
    nxt = replace(ts, pc=_Pc.TRUNCATE, cursor=start) if last else replace(ts, cursor=ts.cursor + 1)
    w.set_thread(name, nxt)
    return Label("unmap_mapping_range", f"VMA {vma.id}: {'; '.join(changes) or 'nothing mapped'}")


def _truncate(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label | None:
    end = op.start + op.pages
    for fi in range(ts.cursor, end):
        fid = w.cached(op.file, fi)
        if fid is None:
            continue
        frame = w.frame(fid)
        if frame.locked is not None:
            return None
        w.set_frame(fid, replace(frame, locked=name))
        w.set_thread(name, replace(ts, pc=_Pc.REMOVE, cursor=fi, page=fid))
        return Label("shmem_undo_range", f"locked frame #{fid} (file page {fi})")
    w.set_thread(name, replace(ts, pc=_Pc.END, cursor=end))
    return Label("shmem_undo_range", "no page left in the hole")


def _remove(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label:
    fid = ts.page
    assert fid is not None
    fi = ts.cursor
    frame = w.frame(fid)
    unmapped = []
    # truncate_cleanup_folio() calls unmap_mapping_folio() only while the folio is
    # still mapped somewhere; then it zaps the folio's PTEs and, at its index, markers
    # too (ZAP_FLAG_DROP_MARKER). A folio the pre-unmap left unmapped keeps every marker.
    # (A PTE mapping the folio is at index fi of a VMA of the file: read those, noted.)
    around = [(vma, fi - vma.pgoff) for vma in victims(cfg, op) if 0 <= fi - vma.pgoff < vma.pages]
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
    w.set_thread(name, replace(ts, pc=_Pc.TRUNCATE, cursor=fi + 1, page=None))
    gone = f"unmapped {', '.join(unmapped)}; " if unmapped else ""
    return Label(
        "truncate_inode_folio",
        f"{gone}frame #{fid} ({frame.data!r}) removed from the page cache",
    )


def _end(cfg: Config, w: _Step, name: str, ts: _ThreadState, op: Punch) -> Label:
    w.set_punching(op.file, None)
    sleepers = sorted(w.falloc_sleepers(op.file))
    w.set_falloc_sleepers(op.file, frozenset())
    for t in sleepers:
        w.set_thread(t, replace(w.thread(t), pc=_Pc.ACCESS))
    w.set_thread(name, _ThreadState(op=ts.op + 1, faults=ts.faults))
    woke = f"; woke {', '.join(sleepers)}" if sleepers else ""
    return Label("shmem_fallocate", f"hole punched, inode->i_private cleared{woke}")


#: The rule each program counter of a punch runs (ACCESS: it has not started).
STEPS: dict[_Pc, Callable[[Config, _Step, str, _ThreadState, Punch], Label | None]] = {
    _Pc.ACCESS: _publish,
    _Pc.UNMAP: _unmap,
    _Pc.TRUNCATE: _truncate,
    _Pc.REMOVE: _remove,
    _Pc.END: _end,
}

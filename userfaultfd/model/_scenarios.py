"""The seed's scenarios: a system built with the kernel API, threads, and one invariant each.

No scenario says what its outcome should be: verdicts come only from exploring.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import final

from .._flags import Mode as _Mode
from . import _footprint as _fp
from ._config import Config as _Config
from ._kernel import Kernel as _Kernel
from ._ops import CopyPages as _CopyPages
from ._ops import File as _File
from ._ops import Op as _Op
from ._ops import Protect as _Protect
from ._ops import Punch as _Punch
from ._ops import Read as _Read
from ._ops import Serve as _Serve
from ._ops import Write as _Write
from ._ops import WriteBack as _WriteBack
from ._ops import WriteProtect as _WriteProtect
from ._presets import UnknownNameError as _UnknownNameError
from ._state import PAGE_SIZE as _PAGE_SIZE
from ._state import Marker as _Marker
from ._state import Present as _Present
from ._state import ThreadState as _ThreadState
from ._state import World as _World

__all__ = ["SCENARIOS", "Scenario", "Sizes", "get_scenario"]

# 256 MiB: aligned to a page table (2 MiB), so windows clip to the VMA, not to the PMD.
_BASE = 0x1000_0000


@final
@dataclass(frozen=True, slots=True)
class Sizes:
    """How big to build a scenario; None takes the scenario's default.

    ``punch`` gives each puncher's hole as (first file page, pages); without it the punchers
    take the scenario's own ranges.
    """

    readers: int | None = None
    writers: int | None = None
    punchers: int | None = None
    pages: int | None = None
    punch: tuple[tuple[int, int], ...] | None = None

    def over(self, defaults: Sizes) -> Sizes:
        """These sizes, each None filled from ``defaults``."""

        def pick(mine: int | None, theirs: int | None) -> int | None:
            return theirs if mine is None else mine

        return Sizes(
            pick(self.readers, defaults.readers),
            pick(self.writers, defaults.writers),
            pick(self.punchers, defaults.punchers),
            pick(self.pages, defaults.pages),
            defaults.punch if self.punch is None else self.punch,
        )


@final
@dataclass(frozen=True, slots=True)
class Scenario:
    """A system to explore: ``build`` sets up a Kernel and spawns its threads, at the sizes
    given (``defaults`` fills the rest; a size the scenario has no use for is None there);
    ``check`` returns a message if a state breaks ``invariant``."""

    name: str
    summary: str
    invariant: str
    build_sized: Callable[[_Kernel, Sizes], None]
    check: Callable[[_Config, _World], str | None]
    #: Whether writing this footprint key (a record of ._footprint) can change what ``check``
    #: says (a visible step: persistent sets never postpone one).
    watches: Callable[[_Config, Hashable], bool]
    defaults: Sizes = field(default_factory=Sizes)
    #: "history" (the seed's story: what ``table`` shows by default), "kernel" (more of the
    #: kernel a reader would ask about) or "protocol" (a protocol of the userfaultfd runtime,
    #: checked against the kernel).
    group: str = "history"

    @property
    def protocol(self) -> bool:
        return self.group == "protocol"

    def sized(self, sizes: Sizes | None = None) -> Sizes:
        """``sizes`` over the defaults, checked: every size this scenario knows, and only those."""
        got = (sizes or Sizes()).over(self.defaults)
        for name in ("readers", "writers", "punchers", "pages"):
            mine, default = getattr(sizes or Sizes(), name), getattr(self.defaults, name)
            if mine is not None and default is None:
                raise ValueError(f"scenario {self.name} has no {name} to size")
            value = getattr(got, name)
            low = 2 if name == "pages" else 0
            if value is not None and not low <= value <= _MAX_SIZE:
                raise ValueError(f"{name} must be between {low} and {_MAX_SIZE}, got {value}")
        if sizes is not None and sizes.punch is not None:
            if self.defaults.punchers is None:
                raise ValueError(f"scenario {self.name} has no punchers")
            assert got.pages is not None
            for start, pages in sizes.punch:
                if not (start >= 0 and pages >= 1 and start + pages <= got.pages):
                    raise ValueError(
                        f"punch range {start}+{pages} is outside the file's {got.pages} pages"
                    )
        return got

    def build(self, k: _Kernel, sizes: Sizes | None = None) -> None:
        self.build_sized(k, self.sized(sizes))


#: The largest count of any one size (threads or pages) a scenario accepts.
_MAX_SIZE = 64


def _names(base: str, n: int) -> list[str]:
    """``read``, ``read2``, ``read3``...: the first keeps the plain name of the default run."""
    return [base if i == 0 else f"{base}{i + 1}" for i in range(n)]


def _spawn_each(k: _Kernel, base: str, n: int, op: Callable[[int], _Op]) -> None:
    """Spawn ``n`` threads named after ``base`` (see ``_names``), the j-th running ``op(j)``."""
    for j, name in enumerate(_names(base, n)):
        k.spawn(name, op(j))


def _spawn_punches(k: _Kernel, f: _File, holes: Sequence[tuple[int, int]]) -> None:
    """A puncher per hole (first file page, pages): ``punch``, ``punch2``..."""
    _spawn_each(k, "punch", len(holes), lambda j: _Punch(f.id, *holes[j]))


def _done_ops(cfg: _Config, w: _World) -> Iterator[tuple[str, _ThreadState, _Op]]:
    """(thread, its state, op) for every op a thread has completed in ``w``."""
    for name, program in cfg.programs.items():
        ts = w.thread(name)
        for op in program[: ts.op]:
            yield name, ts, op


def _ptes_in_order(w: _World) -> list[tuple[tuple[int, int], _Present | _Marker]]:
    """Every PTE that is not none, by (vma, index), in order (messages name the first)."""
    return sorted(w.ptes(), key=lambda item: item[0])


# -- wp-punch-hole --------------------------------------------------------------------------------
def _build_wp_punch_hole(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None
    assert z.writers is not None and z.punchers is not None
    pages = z.pages
    f = k.shmem_file(pages, cached=range(pages))
    v = k.mmap(f, _BASE, pages, register=_Mode.WP)
    # Writer j writes odd page 2j+1, which the application wrote before (mapping only it) and
    # the server write-protected; punch i punches the i-th of those; reader r reads the even
    # page after it (unmapped: its read fault is what faults around).
    targets = [(2 * j + 1) % pages for j in range(max(z.writers, z.punchers, 1))]
    for t in sorted(set(targets[: z.writers])):
        k.write(v, t, "v1")
        k.writeprotect(v, t)
    _spawn_punches(
        k, f, z.punch or tuple((targets[i % len(targets)], 1) for i in range(z.punchers))
    )
    _spawn_each(k, "read", z.readers, lambda r: _Read(v.id, (2 * r + 2) % pages))
    _spawn_each(k, "write", z.writers, lambda j: _Write(v.id, targets[j], "v2"))
    k.spawn("server", _Serve())


def _untracked_write(cfg: _Config, w: _World) -> str | None:
    for fid, data in w.protected.items():
        frame = w.frame(fid)
        if frame.data != data and fid not in w.saved:
            return (
                f"frame #{fid} (file page {frame.index}) was write-protected holding {data!r} "
                f"and now holds {frame.data!r}, but the server got no WP message for it"
            )
    return None


_PROTECTED_OR_SAVED = (_fp.Log(_fp.Record.SAVED), _fp.Log(_fp.Record.PROTECTED))


def _watches_untracked(cfg: _Config, key: Hashable) -> bool:
    # The check reads frame contents, the protected frames and the saved ones.
    return isinstance(key, _fp.Data) or key in _PROTECTED_OR_SAVED


# -- minor-fault-around ---------------------------------------------------------------------------
def _build_minor_fault_around(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None
    f = k.shmem_file(z.pages, cached=range(z.pages))
    v = k.mmap(f, _BASE, z.pages, register=_Mode.MINOR)
    # Readers of every other page (read0, read2), or of every page once they outnumber those.
    step = 2 if 2 * z.readers <= z.pages else 1
    seen: dict[int, int] = {}
    for r in range(z.readers):
        page = (step * r) % z.pages
        seen[page] = seen.get(page, 0) + 1
        suffix = "" if seen[page] == 1 else f"_{seen[page]}"
        k.spawn(f"read{page}{suffix}", _Read(v.id, page))
    k.spawn("server", _Serve())


def _unnotified_mapping(cfg: _Config, w: _World) -> str | None:
    for (vid, i), pte in _ptes_in_order(w):
        if (
            cfg.vmas[vid].register & _Mode.MINOR
            and isinstance(pte, _Present)
            and (vid, i) not in w.resolved
        ):
            data = w.frame(pte.frame).data
            return (
                f"page {i} of VMA {vid} is mapped to frame #{pte.frame} ({data!r}) "
                "but the server never resolved a MINOR message for it"
            )
    return None


def _watches_unnotified(cfg: _Config, key: Hashable) -> bool:
    # The check reads PTEs of MINOR VMAs and the resolved addresses.
    if isinstance(key, _fp.Pte):
        return bool(cfg.vmas[key.vma].register & _Mode.MINOR)
    return key == _fp.Log(_fp.Record.RESOLVED)


# -- missing-shared-cache -------------------------------------------------------------------------
def _build_missing_shared_cache(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None and z.writers is not None
    pages = z.pages
    f = k.shmem_file(pages)
    filler = k.mmap(f, _BASE, pages, mm=0)
    reader = k.mmap(f, _BASE, pages, mm=1, register=_Mode.MISSING)
    half = pages // 2
    for i in range(half):
        k.write(filler, i, f"a{i}")  # another process filled half the page cache
    # Each reader reads the filled half and two pages more; filler j writes one page past it.
    reads = min(half + 2, pages)
    for name in _names("read", z.readers):
        k.spawn(name, *(_Read(reader.id, i) for i in range(reads)))
    fills = [(half + 1 + j) % pages for j in range(z.writers)]
    _spawn_each(k, "fill", z.writers, lambda j: _Write(filler.id, fills[j], f"a{fills[j]}"))
    k.spawn("server", _Serve())


def _silent_missing(cfg: _Config, w: _World) -> str | None:
    for fid, frame in sorted(w.frames()):
        if (
            frame.origin == "fault"
            and frame.vma >= 0
            and cfg.vmas[frame.vma].register & _Mode.MISSING
        ):
            return (
                f"file page {frame.index} was absent, yet a fault in VMA {frame.vma} "
                f"(registered MISSING) allocated frame #{fid} without a MISSING message"
            )
    return None


def _watches_silent(cfg: _Config, key: Hashable) -> bool:
    # The check reads the frames that exist: only an allocation adds one.
    return key == _fp.ALLOC


# -- live-snapshot --------------------------------------------------------------------------------
def _build_live_snapshot(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None
    assert z.writers is not None and z.punchers is not None
    pages = z.pages
    f = k.shmem_file(pages, cached=range(pages))
    v = k.mmap(f, _BASE, pages, register=_Mode.WP)
    k.write(v, 1, "v1")  # the program wrote page 1 (mapped); the others are only cached
    # The snapshot: protect at one instant, then the background copy; its fault thread.
    k.spawn("snap", _Protect(v.id), _CopyPages(v.id))
    k.spawn("handler", _Serve(snapshot=True))
    # Writers of page 1 (mapped at the instant), then 3 (only cached), 0, 2, ...; punches of
    # page 1 and on; readers of page 2 and on (0 with two pages), whose read faults fault
    # around.
    order = [1, 3, 0, 2, *range(4, pages)]
    targets = [order[j % len(order)] % pages for j in range(max(z.writers, 1))]
    _spawn_each(k, "write", z.writers, lambda j: _Write(v.id, targets[j], "v2"))
    _spawn_punches(k, f, z.punch or tuple(((1 + 2 * i) % pages, 1) for i in range(z.punchers)))
    _spawn_each(k, "read", z.readers, lambda r: _Read(v.id, (2 * r + 2) % pages))


def _stale_snapshot(cfg: _Config, w: _World) -> str | None:
    for key, (fid, data) in sorted(w.snap.items(), key=lambda item: item[0]):
        then_fid, then = w.image[key]
        # A frame the program dropped (punched) since the instant may be saved as anything:
        # "don't drop pages during a snapshot". Any other difference is a lost write.
        if data != then and (then_fid is None or fid == then_fid):
            return (
                f"the snapshot saved page {key[1]} holding {data!r}, but at the protect instant "
                f"it held {then!r} (and nothing dropped it since)"
            )
    return None


def _watches_snapshot(cfg: _Config, key: Hashable) -> bool:
    return isinstance(key, _fp.Snap) or key == _fp.Log(_fp.Record.IMAGE)


# -- overlapping-punches, wp-punch-pmd-edge: the seed's layout, moved ---------------------------
def _build_pmd_edge(k: _Kernel, z: Sizes) -> None:
    assert z.readers is not None and z.writers is not None and z.punchers is not None
    f = k.shmem_file(4, cached=range(4))
    # Pages 0-1 end one page table, pages 2-3 start the next.
    v = k.mmap(f, _BASE - 2 * _PAGE_SIZE, 4, register=_Mode.WP)
    k.write(v, 2, "v1")
    k.writeprotect(v, 2)
    _spawn_punches(k, f, ((2, 1),) * z.punchers)
    # read faults on page 1 (the other page table) first, then on page 3 (the same one)
    _spawn_each(k, "read", z.readers, lambda r: _Read(v.id, (1, 3, 0)[r % 3]))
    _spawn_each(k, "write", z.writers, lambda j: _Write(v.id, 2, "v2"))
    k.spawn("server", _Serve())


# -- minor-continue-punch -------------------------------------------------------------------------
def _build_minor_continue_punch(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None and z.punchers is not None
    f = k.shmem_file(z.pages, cached=range(z.pages))
    v = k.mmap(f, _BASE, z.pages, register=_Mode.MINOR)
    pages = z.pages
    _spawn_each(k, "read", z.readers, lambda r: _Read(v.id, (1 + 2 * r) % pages))
    _spawn_punches(k, f, z.punch or tuple(((1 + 2 * i) % pages, 1) for i in range(z.punchers)))
    k.spawn("server", _Serve())


def _stale_mapping(cfg: _Config, w: _World) -> str | None:
    # After truncation no PTE of a shared mapping may map a frame the page cache dropped.
    for (vid, i), pte in _ptes_in_order(w):
        v = cfg.vmas[vid]
        if not (v.shared and isinstance(pte, _Present)):
            continue
        if w.cached(v.file, v.pgoff + i) != pte.frame:
            return (
                f"page {i} of VMA {vid} maps frame #{pte.frame}, which is no longer the page "
                f"cache's file page {v.pgoff + i}"
            )
    return None


def _watches_mappings(cfg: _Config, key: Hashable) -> bool:
    return isinstance(key, _fp.Pte | _fp.Cache)


# -- private-cow-punch ----------------------------------------------------------------------------
def _build_private_cow_punch(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None
    assert z.writers is not None and z.punchers is not None
    f = k.shmem_file(z.pages, cached=range(z.pages))
    private = k.mmap(f, _BASE, z.pages, shared=False)
    shared = k.mmap(f, _BASE + z.pages * _PAGE_SIZE, z.pages)
    k.write(private, 1, "c1")  # a private copy of page 1 before the punch
    k.read(shared, 2)  # the shared mapping has faulted pages in around page 2
    pages = z.pages
    _spawn_punches(k, f, z.punch or ((0, pages),) * z.punchers)
    _spawn_each(k, "read", z.readers, lambda r: _Read(private.id, (1 + 2 * r) % pages))
    writes = [(3 + 2 * j) % pages for j in range(z.writers)]
    _spawn_each(k, "write", z.writers, lambda j: _Write(private.id, writes[j], f"c{writes[j]}"))


def _lost_private_write(cfg: _Config, w: _World) -> str | None:
    # A private (COW) page keeps what was written to it: unmap_mapping_range(even_cows=0) and
    # truncation leave anonymous copies mapped.
    written = {(1, "c1")}  # the setup's write
    written |= {(op.index, op.data) for _, _, op in _done_ops(cfg, w) if isinstance(op, _Write)}
    private = next(v for v in cfg.vmas if not v.shared)
    for i, data in sorted(written):
        pte = w.pte(private.id, i)
        got = w.frame(pte.frame).data if isinstance(pte, _Present) else None
        if got != data:
            return f"private page {i} was written {data!r} but now reads as {got!r}"
    for name, ts, op in _done_ops(cfg, w):
        if isinstance(op, _Read) and (op.index, ts.value) not in written and op.index == 1:
            return f"{name} read {ts.value!r} from private page 1, written 'c1'"
    return None


def _watches_private(cfg: _Config, key: Hashable) -> bool:
    return isinstance(key, _fp.Pte | _fp.Data | _fp.Thread)


# -- missing-fill ---------------------------------------------------------------------------------
def _build_missing_fill(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None and z.writers is not None
    pages = z.pages
    f = k.shmem_file(pages)
    other = k.mmap(f, _BASE, pages, mm=0)
    lazy = k.mmap(f, _BASE, pages, mm=1, register=_Mode.MISSING)
    k.write(other, 1, "a1")  # another process filled page 1 before
    k.spawn("handler", _Serve(prefetch=2))
    k.spawn("other", _Write(other.id, 1, "b1"))  # ... and writes it again during the run
    _spawn_each(k, "read", z.readers, lambda r: _Read(lazy.id, (2 * r) % pages))
    writes = [(1 + 2 * j) % pages for j in range(z.writers)]
    _spawn_each(k, "write", z.writers, lambda j: _Write(lazy.id, writes[j], f"w{writes[j]}"))


def _unfilled_read(cfg: _Config, w: _World) -> str | None:
    # A load returns the store's contents (the handler's copy), or what someone wrote there:
    # never zeros (a page the kernel allocated behind the handler's back).
    for name, ts, op in _done_ops(cfg, w):
        if not isinstance(op, _Read):
            continue
        v = cfg.vmas[op.vma]
        fi = v.pgoff + op.index
        legit = {f"s{fi}"} | ({"a1"} if fi == 1 else set())  # the setup's write
        legit |= {
            o.data
            for p in cfg.programs.values()
            for o in p
            if isinstance(o, _Write) and cfg.vmas[o.vma].pgoff + o.index == fi
        }
        if ts.value not in legit:
            what = "zeros" if ts.value == "0" else repr(ts.value)
            return f"{name} read {what} from page {op.index}, which nobody put there"
    return None


def _watches_values(cfg: _Config, key: Hashable) -> bool:
    return isinstance(key, _fp.Value)


# -- pager-evict ----------------------------------------------------------------------------------
def _build_pager_evict(k: _Kernel, z: Sizes) -> None:
    assert z.pages is not None and z.readers is not None and z.writers is not None
    pages = z.pages
    if z.writers > pages:
        raise ValueError(f"pager-evict has one writer per page: at most {pages} writers")
    f = k.shmem_file(pages)  # the pager's memfd: empty, every page is filled on demand
    v = k.mmap(f, _BASE, pages, register=_Mode.MISSING | _Mode.WP)
    # Before the run the program read page 0 (filled from the store, write-protected) and
    # wrote 'v1' to it (a WP fault: the pager marked it dirty and lifted the protection).
    k.copy(v, 0, wp=True)
    k.writeprotect(v, 0, protect=False)
    k.mark_dirty(v, 0)
    k.write(v, 0, "v1")
    # Over budget, the handler evicts page 0 (protect, write back, punch), then serves.
    k.spawn(
        "handler",
        _WriteProtect(v.id, 0),
        _WriteBack(v.id, 0),
        _Punch(f.id, 0, 1),
        _Serve(pager=True),
    )
    # Writer j writes page j (page 0 is the one being evicted); reader r reads page r + 1
    # (absent: its read fault is the one that faults around), wrapping to page 0.
    _spawn_each(k, "write", z.writers, lambda j: _Write(v.id, j, "v2"))
    _spawn_each(k, "read", z.readers, lambda r: _Read(v.id, (r + 1) % pages))


#: What the pager-evict setup wrote before the run: file page -> contents.
_PAGER_SETUP = {0: "v1"}


def _lost_write(cfg: _Config, w: _World) -> str | None:
    # A page holds the last value written to it: in its frame while it is in the page cache,
    # in the store once evicted. (One writer a page: a completed write is the last one.)
    vma = next(v for v in cfg.vmas if v.register & _Mode.WP)
    written = dict(_PAGER_SETUP)
    for _, _, op in _done_ops(cfg, w):
        if isinstance(op, _Write):
            written[vma.pgoff + op.index] = op.data
    for fi, data in sorted(written.items()):
        fid = w.cached(vma.file, fi)
        held = None if fid is None else w.frame(fid).data
        if held is not None and held != data:
            return f"page {fi} was written {data!r}, but its page in the cache holds {held!r}"
        if fid is None and w.stored(vma.file, fi) != data:
            return (
                f"page {fi} was written {data!r}, but it was evicted and the store holds "
                f"{w.stored(vma.file, fi)!r}: the write is lost"
            )
    for name, ts, op in _done_ops(cfg, w):
        if isinstance(op, _Read) and ts.value == "0":
            return f"{name} read zeros from page {op.index}"
    return None


_STORE = _fp.Log(_fp.Record.STORE)


def _watches_lost(cfg: _Config, key: Hashable) -> bool:
    # The check reads frame contents, the cache's slots, the store and what loads returned.
    # Which writes completed it reads from the threads, but a write completes in the very
    # step that stores its value, a value no frame of its page held before (Data).
    return isinstance(key, _fp.Data | _fp.Cache | _fp.Value) or key == _STORE


#: Every scenario, in a stable order.
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "wp-punch-hole",
            "the seed: punch a hole over a write-protected shmem page while a neighbour's read "
            "fault faults around and another thread writes the page",
            "untracked write",
            _build_wp_punch_hole,
            _untracked_write,
            _watches_untracked,
            Sizes(readers=1, writers=1, punchers=1, pages=4),
        ),
        Scenario(
            "minor-fault-around",
            "two readers of a MINOR-registered shmem range whose pages are all cached",
            "unnotified mapping",
            _build_minor_fault_around,
            _unnotified_mapping,
            _watches_unnotified,
            Sizes(readers=2, pages=4),
        ),
        Scenario(
            "missing-shared-cache",
            "a MISSING-registered mapping reads pages another process half filled in the cache, "
            "while that process writes one more",
            "silent missing page",
            _build_missing_shared_cache,
            _silent_missing,
            _watches_silent,
            Sizes(readers=1, writers=1, pages=8),
        ),
        Scenario(
            "overlapping-punches",
            "the seed's layout with two hole punches over overlapping ranges [0, 2) and "
            "[1, 3), which inode_lock serializes",
            "untracked write",
            _build_wp_punch_hole,
            _untracked_write,
            _watches_untracked,
            Sizes(readers=1, writers=1, punchers=2, pages=4, punch=((0, 2), (1, 2))),
            group="kernel",
        ),
        Scenario(
            "wp-punch-pmd-edge",
            "the seed's race across a page-table boundary: the read faults in the page table "
            "before the punched, protected page (a second reader faults in the same one)",
            "untracked write",
            _build_pmd_edge,
            _untracked_write,
            _watches_untracked,
            Sizes(readers=1, writers=1, punchers=1),
            group="kernel",
        ),
        Scenario(
            "minor-continue-punch",
            "a hole punch racing a MINOR server between its update and its UFFDIO_CONTINUE",
            "stale mapping",
            _build_minor_continue_punch,
            _stale_mapping,
            _watches_mappings,
            Sizes(readers=1, punchers=1, pages=4),
            group="kernel",
        ),
        Scenario(
            "private-cow-punch",
            "a private (COW) mapping of a file punched whole while it is read and written",
            "lost private write",
            _build_private_cow_punch,
            _lost_private_write,
            _watches_private,
            Sizes(readers=1, writers=1, punchers=1, pages=4),
            group="kernel",
        ),
        Scenario(
            "missing-fill",
            "the runtime handler's fill path (copy the faulting page first, EEXIST: someone "
            "else filled it; prefetch the next pages, stopping at one already there) against "
            "readers, a writer and another process writing the file",
            "unfilled read",
            _build_missing_fill,
            _unfilled_read,
            _watches_values,
            Sizes(readers=2, writers=1, pages=4),
            group="protocol",
        ),
        Scenario(
            "pager-evict",
            "the out-of-core pager (fill write-protected from the store, mark dirty on the WP "
            "fault; evict = protect, write back if dirty, punch) evicting a dirty page while "
            "a writer writes it and a reader faults on its neighbour",
            "lost write",
            _build_pager_evict,
            _lost_write,
            _watches_lost,
            Sizes(readers=1, writers=1, pages=2),
            group="protocol",
        ),
        Scenario(
            "live-snapshot",
            "the live snapshot protocol (protect at one instant, save-then-unprotect on WP "
            "faults, a background copy) against writers, a hole punch and a faulting-around read",
            "stale snapshot",
            _build_live_snapshot,
            _stale_snapshot,
            _watches_snapshot,
            Sizes(readers=1, writers=1, punchers=1, pages=2),
            group="protocol",
        ),
    )
}


def get_scenario(scenario: Scenario | str) -> Scenario:
    """The scenario of that name (a Scenario passes through)."""
    if isinstance(scenario, Scenario):
        return scenario
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise _UnknownNameError(
            f"unknown scenario {scenario!r} (choose from {', '.join(SCENARIOS)})"
        ) from None

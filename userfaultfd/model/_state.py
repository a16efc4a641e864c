"""The model's state: small frozen records, the World that holds one snapshot of them, and Step.

A World is a value the explorer can hash and keep: its tables are private and it offers only
reads, which note nothing (invariants, futures, diagrams and the direct API look at states; they
are not steps). A rule never sees a World: it is handed a :class:`Step`, a private copy of the
World it starts from whose accessors note every object read or written. That footprint is what
the explorer's reduction uses to tell independent steps apart, so it is taken from what a step
actually touched rather than declared by hand, and no rule can read around it. Step sits in this
module because it is the only code that writes a World's tables.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, ItemsView, Mapping
from dataclasses import dataclass
from typing import final

from .._flags import Mode as _Mode
from . import _footprint as fp

__all__ = [
    "ASLEEP",
    "MARKER",
    "PAGE_SIZE",
    "PTRS_PER_PTE",
    "Event",
    "Frame",
    "Marker",
    "Pc",
    "Present",
    "Pte",
    "Step",
    "ThreadState",
    "World",
    "store_text",
]

#: Bytes in a base page (x86-64, arm64 with 4 KiB pages).
PAGE_SIZE = 4096
#: PTEs in one page table, the span a PMD maps (2 MiB): fault-around never crosses it.
PTRS_PER_PTE = 512


@final
@dataclass(frozen=True, slots=True)
class Present:
    """A present PTE: the frame it maps, whether writes go straight through, the uffd-wp bit."""

    frame: int
    writable: bool
    uffd_wp: bool


@final
@dataclass(frozen=True, slots=True)
class Marker:
    """PTE_MARKER_UFFD_WP: a non-present PTE left where a protected PTE was zapped (5.19+)."""


#: A PTE; ``None`` stands for pte_none().
Pte = Present | Marker | None

#: The one marker value (markers carry no data beyond their kind).
MARKER = Marker()


@final
@dataclass(frozen=True, slots=True)
class Frame:
    """A page frame (struct folio): contents and flags; ``locked`` names the lock holder."""

    data: str
    locked: str | None
    uptodate: bool
    #: The file page it was allocated for (for messages; frames move nowhere in this model).
    index: int
    #: Who allocated it: "setup", "fault", "copy" (UFFDIO_COPY) or "cow" (private anon copy).
    origin: str
    #: The VMA whose fault or UFFDIO_COPY allocated it, -1 if none.
    vma: int = -1

    @property
    def anon(self) -> bool:
        return self.origin == "cow"


@final
@dataclass(frozen=True, slots=True)
class Event:
    """A userfault message the kernel queued; ``frame`` is model bookkeeping for WP faults."""

    mode: _Mode
    vma: int
    index: int
    thread: str
    frame: int | None = None


class Pc(enum.Enum):
    """A thread's program counter: the step of its op it takes next (see kernel.py's table)."""

    #: The op's first step; for a Read or Write, the CPU's access (a woken fault retries here).
    ACCESS = "access"
    # The fault path of a Read or Write.
    FAULT_AROUND = "fault_around"
    SHMEM_FAULT = "shmem_fault"
    GET_FOLIO = "get_folio"
    LOCK_PAGE = "lock_page"
    FINISH_FAULT = "finish_fault"
    WP_PAGE = "wp_page"
    #: Asleep in handle_userfault() until a server's ioctl wakes it.
    USERFAULT = "userfault"
    #: Asleep in shmem_falloc_wait() until the punch ends.
    FALLOC_WAIT = "falloc_wait"
    #: The access ended in SIGBUS (the op is over).
    SIGBUS = "sigbus"
    # A hole punch, after it published the hole (ACCESS).
    UNMAP = "unmap"
    TRUNCATE = "truncate"
    REMOVE = "remove"
    END = "end"
    #: A server between messages.
    WAIT = "wait"
    # A server resolving a message (UNPROTECT is also the snapshot copier's second step).
    COPY = "copy"
    PREFETCH = "prefetch"
    UPDATE = "update"
    CONTINUE = "continue"
    SNAPSHOT = "snapshot"
    SAVE = "save"
    UNPROTECT = "unprotect"
    # The pager's handler resolving a message: fill from the store, or mark dirty + unprotect.
    FILL = "fill"
    DIRTY = "dirty"

    # Every World key hashes each thread's pc: identity hashing (members are singletons) keeps
    # that at C speed, where Enum's own __hash__ is a Python call (a third slower exploration).
    __hash__ = object.__hash__


def store_text(index: int) -> str:
    """What the pager's store holds for file page ``index`` before anything is written back."""
    return f"s{index}"


#: Program counters a thread sleeps at: only another thread's step (a wake) moves it on.
ASLEEP = frozenset({Pc.USERFAULT, Pc.FALLOC_WAIT})


@final
@dataclass(frozen=True, slots=True)
class ThreadState:
    """Where a thread is: its op, the kernel step it takes next, and what that step needs."""

    op: int = 0
    pc: Pc = Pc.ACCESS
    #: The frame this fault holds (locked, or looked up), if any.
    page: int | None = None
    #: The PTE the fault started from (pte_same() checks against it).
    orig: Present | Marker | None = None
    #: Per-op position: a punch's VMA or file index, for instance.
    cursor: int = 0
    #: The message the server is handling.
    event: Event | None = None
    #: Page faults this thread took (entries into handle_mm_fault).
    faults: int = 0
    #: The value the last read returned, or an error ("SIGBUS").
    value: str | None = None


class World:
    """One snapshot of everything that changes: page tables, page cache, frames, waiters.

    PTEs are keyed by (vma, page index in the VMA); the page cache by (file, file page index);
    ``punching`` is inode->i_private (the range being punched) per file; ``sleepers`` are the
    threads asleep in handle_userfault() at an address (vma, index); ``protected``, ``saved``,
    ``notified``, ``resolved``, ``image``, ``snap``, ``store`` and ``dirty`` are the userfaultfd
    server's own records (userspace, not kernel state). Reads here note nothing: a step reads
    through its Step.
    """

    __slots__ = (
        "_cache",
        "_dirty",
        "_falloc",
        "_falloc_waiters",
        "_frames",
        "_image",
        "_key",
        "_next_frame",
        "_notified",
        "_protected",
        "_ptes",
        "_queue",
        "_resolved",
        "_saved",
        "_snap",
        "_store",
        "_threads",
        "_waiters",
    )

    def __init__(self) -> None:
        self._ptes: dict[tuple[int, int], Present | Marker] = {}
        self._cache: dict[tuple[int, int], int] = {}
        self._frames: dict[int, Frame] = {}
        self._next_frame = 1
        self._falloc: dict[int, tuple[int, int]] = {}
        self._falloc_waiters: dict[int, frozenset[str]] = {}
        self._queue: tuple[Event, ...] = ()
        self._waiters: dict[tuple[int, int], frozenset[str]] = {}
        self._threads: dict[str, ThreadState] = {}
        # Frames the server write-protected, with the contents it protected.
        self._protected: dict[int, str] = {}
        # Frames whose contents the server saved after a WP message.
        self._saved: frozenset[int] = frozenset()
        # (mode, vma, index) of every message the server read.
        self._notified: frozenset[tuple[_Mode, int, int]] = frozenset()
        # (vma, index) the server resolved with UFFDIO_CONTINUE after updating the page.
        self._resolved: frozenset[tuple[int, int]] = frozenset()
        # The live snapshot: each page's (frame or None, contents) at the protect instant
        # (ground truth, for the invariant), and what the snapshot saved for it.
        self._image: dict[tuple[int, int], tuple[int | None, str]] = {}
        self._snap: dict[tuple[int, int], tuple[int | None, str]] = {}
        # The pager: what it wrote back to its store per (file, file page) (a page never written
        # back holds its original contents, store_text()), and its dirty (file, file page)s.
        self._store: dict[tuple[int, int], str] = {}
        self._dirty: frozenset[tuple[int, int]] = frozenset()
        self._key: Hashable | None = None

    def _copy(self) -> World:
        w = World.__new__(World)
        w._ptes = self._ptes.copy()
        w._cache = self._cache.copy()
        w._frames = self._frames.copy()
        w._next_frame = self._next_frame
        w._falloc = self._falloc.copy()
        w._falloc_waiters = self._falloc_waiters.copy()
        w._queue = self._queue
        w._waiters = self._waiters.copy()
        w._threads = self._threads.copy()
        # The server's records are replaced whole when they change: share them.
        w._protected = self._protected
        w._saved = self._saved
        w._notified = self._notified
        w._resolved = self._resolved
        w._image = self._image
        w._snap = self._snap
        w._store = self._store
        w._dirty = self._dirty
        w._key = None
        return w

    def key(self) -> Hashable:
        """A canonical, hashable image of the state."""
        if self._key is None:
            self._key = (
                frozenset(self._ptes.items()),
                frozenset(self._cache.items()),
                frozenset(self._frames.items()),
                self._next_frame,
                frozenset(self._falloc.items()),
                frozenset(self._falloc_waiters.items()),
                self._queue,
                frozenset(self._waiters.items()),
                frozenset(self._threads.items()),
                frozenset(self._protected.items()),
                self._saved,
                self._notified,
                self._resolved,
                frozenset(self._image.items()),
                frozenset(self._snap.items()),
                frozenset(self._store.items()),
                self._dirty,
            )
        return self._key

    # -- reads (noting nothing) --------------------------------------------------------------------
    def pte(self, vma: int, index: int) -> Pte:
        return self._ptes.get((vma, index))

    def ptes(self) -> ItemsView[tuple[int, int], Present | Marker]:
        """Every PTE that is not none, by (vma, index)."""
        return self._ptes.items()

    def cached(self, file: int, index: int) -> int | None:
        return self._cache.get((file, index))

    def cache(self) -> ItemsView[tuple[int, int], int]:
        """The page cache: frame by (file, file page index)."""
        return self._cache.items()

    def frame(self, frame: int) -> Frame:
        return self._frames[frame]

    def frames(self) -> ItemsView[int, Frame]:
        return self._frames.items()

    @property
    def next_frame(self) -> int:
        """The number the next allocated frame gets."""
        return self._next_frame

    def punching(self, file: int) -> tuple[int, int] | None:
        """inode->i_private: the range of ``file`` being punched, if a punch is in progress."""
        return self._falloc.get(file)

    def falloc_sleepers(self, file: int) -> frozenset[str]:
        return self._falloc_waiters.get(file, frozenset())

    @property
    def queue(self) -> tuple[Event, ...]:
        """The messages queued on the userfaultfd, oldest first."""
        return self._queue

    def sleepers(self, vma: int, index: int) -> frozenset[str]:
        return self._waiters.get((vma, index), frozenset())

    def thread(self, name: str) -> ThreadState:
        return self._threads[name]

    def threads(self) -> ItemsView[str, ThreadState]:
        return self._threads.items()

    @property
    def protected(self) -> Mapping[int, str]:
        """Frames the server write-protected, with the contents it protected."""
        return self._protected

    @property
    def saved(self) -> frozenset[int]:
        """Frames whose contents the server saved after a WP message."""
        return self._saved

    @property
    def notified(self) -> frozenset[tuple[_Mode, int, int]]:
        """(mode, vma, index) of every message the server read."""
        return self._notified

    @property
    def resolved(self) -> frozenset[tuple[int, int]]:
        """(vma, index) the server resolved with UFFDIO_CONTINUE after updating the page."""
        return self._resolved

    @property
    def image(self) -> Mapping[tuple[int, int], tuple[int | None, str]]:
        """The live snapshot's ground truth: each page's (frame or None, contents) at the
        protect instant."""
        return self._image

    @property
    def snap(self) -> Mapping[tuple[int, int], tuple[int | None, str]]:
        """What the live snapshot saved for each page: (frame or None, contents)."""
        return self._snap

    def stored(self, file: int, index: int) -> str:
        """What the pager's store holds for file page ``index``."""
        return self._store.get((file, index), store_text(index))

    @property
    def dirty(self) -> frozenset[tuple[int, int]]:
        """The pager's dirty pages, as (file, file page)."""
        return self._dirty


class Step:
    """One step under way: a private copy of the World it started from, changed only through
    the accessors below, each of which notes the object it reads or writes (the footprint).

    ``before`` is the World the step started from, unchanged: labels may look at it (a label
    is not behaviour, so what it reads is not part of the footprint). ``after`` is the World the
    step made; the Step is not used after that.
    """

    __slots__ = ("_w", "before", "reads", "writes")

    def __init__(self, before: World) -> None:
        self.before = before
        self._w = before._copy()
        self.reads: set[fp.Key] = set()
        self.writes: set[fp.Key] = set()

    @property
    def after(self) -> World:
        return self._w

    def pte(self, vma: int, index: int) -> Pte:
        self.reads.add(fp.Pte(vma, index))
        return self._w._ptes.get((vma, index))

    def set_pte(self, vma: int, index: int, pte: Pte) -> None:
        self.writes.add(fp.Pte(vma, index))
        if pte is None:
            self._w._ptes.pop((vma, index), None)
        else:
            self._w._ptes[(vma, index)] = pte

    def cached(self, file: int, index: int) -> int | None:
        self.reads.add(fp.Cache(file, index))
        return self._w._cache.get((file, index))

    def set_cached(self, file: int, index: int, frame: int | None) -> None:
        self.writes.add(fp.Cache(file, index))
        if frame is None:
            self._w._cache.pop((file, index), None)
        else:
            self._w._cache[(file, index)] = frame

    def frame(self, frame: int) -> Frame:
        self.reads.add(fp.Frame(frame))
        return self._w._frames[frame]

    def set_frame(self, frame: int, value: Frame) -> None:
        self.writes.add(fp.Frame(frame))
        old = self._w._frames.get(frame)
        if old is not None and old.data != value.data:
            # Nobody reads this key: it marks a change of contents for invariants that watch
            # them (a new frame is marked by fp.ALLOC instead).
            self.writes.add(fp.Data(frame))
        self._w._frames[frame] = value

    def new_frame(self, value: Frame) -> int:
        # The allocation counter is shared: two allocations do not commute (frame numbers differ).
        self.reads.add(fp.ALLOC)
        self.writes.add(fp.ALLOC)
        fid = self._w._next_frame
        self._w._next_frame += 1
        self.set_frame(fid, value)
        return fid

    def punching(self, file: int) -> tuple[int, int] | None:
        """inode->i_private as a whole: whether a punch of ``file`` is in progress."""
        self.reads.add(fp.Inode(file))
        return self._w._falloc.get(file)

    def hole(self, file: int, index: int) -> tuple[int, int] | None:
        """The range being punched if it covers file page ``index`` (what shmem_fault asks)."""
        self.reads.add(fp.Falloc(file, index))
        span = self._w._falloc.get(file)
        return span if span is not None and span[0] <= index < span[1] else None

    def set_punching(self, file: int, span: tuple[int, int] | None) -> None:
        self.writes.add(fp.Inode(file))
        for old_or_new in (self._w._falloc.get(file), span):
            if old_or_new is not None:
                self.writes.update(fp.Falloc(file, i) for i in range(*old_or_new))
        if span is None:
            self._w._falloc.pop(file, None)
        else:
            self._w._falloc[file] = span

    def falloc_sleepers(self, file: int) -> frozenset[str]:
        self.reads.add(fp.FallocWait(file))
        return self._w._falloc_waiters.get(file, frozenset())

    def set_falloc_sleepers(self, file: int, threads: frozenset[str]) -> None:
        self.writes.add(fp.FallocWait(file))
        if threads:
            self._w._falloc_waiters[file] = threads
        else:
            self._w._falloc_waiters.pop(file, None)

    def push_event(self, event: Event) -> None:
        self.reads.add(fp.UFFD)
        self.writes.add(fp.UFFD)
        self._w._queue = (*self._w._queue, event)

    def pop_event(self) -> Event | None:
        self.reads.add(fp.UFFD)
        if not self._w._queue:
            return None
        self.writes.add(fp.UFFD)
        event, self._w._queue = self._w._queue[0], self._w._queue[1:]
        return event

    def sleepers(self, vma: int, index: int) -> frozenset[str]:
        self.reads.add(fp.Waiters(vma, index))
        return self._w._waiters.get((vma, index), frozenset())

    def set_sleepers(self, vma: int, index: int, threads: frozenset[str]) -> None:
        self.writes.add(fp.Waiters(vma, index))
        if threads:
            self._w._waiters[(vma, index)] = threads
        else:
            self._w._waiters.pop((vma, index), None)

    def thread(self, name: str) -> ThreadState:
        self.reads.add(fp.Thread(name))
        return self._w._threads[name]

    def set_thread(self, name: str, state: ThreadState) -> None:
        self.writes.add(fp.Thread(name))
        self._w._threads[name] = state

    def drop_thread(self, name: str) -> None:
        self.writes.add(fp.Thread(name))
        del self._w._threads[name]

    def loaded(self, name: str) -> None:
        """Note that thread ``name``'s load returned a value: read by no step, the key marks it
        for invariants that watch what loads return."""
        self.writes.add(fp.Value(name))

    def snapped(self, vma: int, index: int) -> tuple[int | None, str] | None:
        self.reads.add(fp.Snap(vma, index))
        return self._w._snap.get((vma, index))

    def set_snapped(self, vma: int, index: int, saved: tuple[int | None, str]) -> None:
        self.writes.add(fp.Snap(vma, index))
        self._w._snap = {**self._w._snap, (vma, index): saved}

    # -- the server's records (shared state too: each is one object of the footprint) ----------
    def _log(self, record: fp.Record) -> None:
        key = fp.Log(record)
        self.reads.add(key)
        self.writes.add(key)

    def add_protected(self, frame: int, data: str) -> None:
        self._log(fp.Record.PROTECTED)
        self._w._protected = {**self._w._protected, frame: data}

    def add_saved(self, frame: int) -> None:
        self._log(fp.Record.SAVED)
        self._w._saved = self._w._saved | {frame}

    def add_notified(self, mode: _Mode, vma: int, index: int) -> None:
        self._log(fp.Record.NOTIFIED)
        self._w._notified = self._w._notified | {(mode, vma, index)}

    def add_resolved(self, vma: int, index: int) -> None:
        self._log(fp.Record.RESOLVED)
        self._w._resolved = self._w._resolved | {(vma, index)}

    def set_image(self, vma: int, index: int, page: tuple[int | None, str]) -> None:
        self._log(fp.Record.IMAGE)
        self._w._image = {**self._w._image, (vma, index): page}

    def stored(self, file: int, index: int) -> str:
        self.reads.add(fp.Log(fp.Record.STORE))
        return self._w._store.get((file, index), store_text(index))

    def set_stored(self, file: int, index: int, data: str) -> None:
        self.writes.add(fp.Log(fp.Record.STORE))
        self._w._store = {**self._w._store, (file, index): data}

    def is_dirty(self, file: int, index: int) -> bool:
        self.reads.add(fp.Log(fp.Record.DIRTY))
        return (file, index) in self._w._dirty

    def set_dirty(self, file: int, index: int, dirty: bool) -> None:
        self._log(fp.Record.DIRTY)
        page = frozenset({(file, index)})
        self._w._dirty = self._w._dirty | page if dirty else self._w._dirty - page

"""The model's state: small frozen records, and the World that holds one snapshot of them.

A World is a value the explorer can hash and keep. Rules never change a World they were given:
they clone it and change the clone through the accessors below, which note every object read or
written. That footprint is what the explorer's reduction uses to tell independent steps apart, so
it is taken from what a step actually touched rather than declared by hand.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass

from .._flags import Mode as _Mode

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
    "ThreadState",
    "World",
]

#: Bytes in a base page (x86-64, arm64 with 4 KiB pages).
PAGE_SIZE = 4096
#: PTEs in one page table, the span a PMD maps (2 MiB): fault-around never crosses it.
PTRS_PER_PTE = 512


@dataclass(frozen=True, slots=True)
class Present:
    """A present PTE: the frame it maps, whether writes go straight through, the uffd-wp bit."""

    frame: int
    writable: bool
    uffd_wp: bool


@dataclass(frozen=True, slots=True)
class Marker:
    """PTE_MARKER_UFFD_WP: a non-present PTE left where a protected PTE was zapped (5.19+)."""


#: A PTE; ``None`` stands for pte_none().
Pte = Present | Marker | None

#: The one marker value (markers carry no data beyond their kind).
MARKER = Marker()


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

    # Every World key hashes each thread's pc: identity hashing (members are singletons) keeps
    # that at C speed, where Enum's own __hash__ is a Python call (a third slower exploration).
    __hash__ = object.__hash__


#: Program counters a thread sleeps at: only another thread's step (a wake) moves it on.
ASLEEP = frozenset({Pc.USERFAULT, Pc.FALLOC_WAIT})


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

    ``ptes`` keys are (vma, page index in the VMA); ``cache`` keys are (file, file page index);
    ``falloc`` is inode->i_private (the range being punched) per file; ``waiters`` maps an
    address (vma, index) to the threads asleep in handle_userfault() there; the last three
    fields are the userfaultfd server's own records (userspace, not kernel state).
    """

    __slots__ = (
        "_key",
        "cache",
        "falloc",
        "falloc_waiters",
        "frames",
        "image",
        "next_frame",
        "notified",
        "protected",
        "ptes",
        "queue",
        "reads",
        "resolved",
        "saved",
        "snap",
        "threads",
        "waiters",
        "writes",
    )

    def __init__(self) -> None:
        self.ptes: dict[tuple[int, int], Present | Marker] = {}
        self.cache: dict[tuple[int, int], int] = {}
        self.frames: dict[int, Frame] = {}
        self.next_frame = 1
        self.falloc: dict[int, tuple[int, int]] = {}
        self.falloc_waiters: dict[int, frozenset[str]] = {}
        self.queue: tuple[Event, ...] = ()
        self.waiters: dict[tuple[int, int], frozenset[str]] = {}
        self.threads: dict[str, ThreadState] = {}
        #: Frames the server write-protected, with the contents it protected.
        self.protected: dict[int, str] = {}
        #: Frames whose contents the server saved after a WP message.
        self.saved: frozenset[int] = frozenset()
        #: (mode, vma, index) of every message the server read.
        self.notified: frozenset[tuple[_Mode, int, int]] = frozenset()
        #: (vma, index) the server resolved with UFFDIO_CONTINUE after updating the page.
        self.resolved: frozenset[tuple[int, int]] = frozenset()
        #: The live snapshot: each page's (frame or None, contents) at the protect instant
        #: (ground truth, for the invariant), and what the snapshot saved for it.
        self.image: dict[tuple[int, int], tuple[int | None, str]] = {}
        self.snap: dict[tuple[int, int], tuple[int | None, str]] = {}
        self.reads: set[Hashable] = set()
        self.writes: set[Hashable] = set()
        self._key: Hashable | None = None

    def clone(self) -> World:
        w = World.__new__(World)
        w.ptes = self.ptes.copy()
        w.cache = self.cache.copy()
        w.frames = self.frames.copy()
        w.next_frame = self.next_frame
        w.falloc = self.falloc.copy()
        w.falloc_waiters = self.falloc_waiters.copy()
        w.queue = self.queue
        w.waiters = self.waiters.copy()
        w.threads = self.threads.copy()
        w.protected = self.protected
        w.saved = self.saved
        w.notified = self.notified
        w.resolved = self.resolved
        w.image = self.image
        w.snap = self.snap
        w.reads = set()
        w.writes = set()
        w._key = None
        return w

    def key(self) -> Hashable:
        """A canonical, hashable image of the state (the footprint sets are not state)."""
        if self._key is None:
            self._key = (
                frozenset(self.ptes.items()),
                frozenset(self.cache.items()),
                frozenset(self.frames.items()),
                self.next_frame,
                frozenset(self.falloc.items()),
                frozenset(self.falloc_waiters.items()),
                self.queue,
                frozenset(self.waiters.items()),
                frozenset(self.threads.items()),
                frozenset(self.protected.items()),
                self.saved,
                self.notified,
                self.resolved,
                frozenset(self.image.items()),
                frozenset(self.snap.items()),
            )
        return self._key

    # -- accessors that record the footprint ------------------------------------------------------
    def pte(self, vma: int, index: int) -> Pte:
        self.reads.add(("pte", vma, index))
        return self.ptes.get((vma, index))

    def set_pte(self, vma: int, index: int, pte: Pte) -> None:
        self.writes.add(("pte", vma, index))
        if pte is None:
            self.ptes.pop((vma, index), None)
        else:
            self.ptes[(vma, index)] = pte

    def cached(self, file: int, index: int) -> int | None:
        self.reads.add(("cache", file, index))
        return self.cache.get((file, index))

    def set_cached(self, file: int, index: int, frame: int | None) -> None:
        self.writes.add(("cache", file, index))
        if frame is None:
            self.cache.pop((file, index), None)
        else:
            self.cache[(file, index)] = frame

    def frame(self, frame: int) -> Frame:
        self.reads.add(("frame", frame))
        return self.frames[frame]

    def set_frame(self, frame: int, value: Frame) -> None:
        self.writes.add(("frame", frame))
        old = self.frames.get(frame)
        if old is not None and old.data != value.data:
            # Nobody reads this tag: it marks a change of contents for invariants that watch
            # them (a new frame is marked by ("alloc",) instead).
            self.writes.add(("data", frame))
        self.frames[frame] = value

    def new_frame(self, value: Frame) -> int:
        # The allocation counter is shared: two allocations do not commute (frame numbers differ).
        self.reads.add(("alloc",))
        self.writes.add(("alloc",))
        fid = self.next_frame
        self.next_frame += 1
        self.set_frame(fid, value)
        return fid

    def punching(self, file: int) -> tuple[int, int] | None:
        """inode->i_private as a whole: whether a punch of ``file`` is in progress."""
        self.reads.add(("inode", file))
        return self.falloc.get(file)

    def hole(self, file: int, index: int) -> tuple[int, int] | None:
        """The range being punched if it covers file page ``index`` (what shmem_fault asks)."""
        self.reads.add(("falloc", file, index))
        span = self.falloc.get(file)
        return span if span is not None and span[0] <= index < span[1] else None

    def set_punching(self, file: int, span: tuple[int, int] | None) -> None:
        self.writes.add(("inode", file))
        for old_or_new in (self.falloc.get(file), span):
            if old_or_new is not None:
                self.writes.update(("falloc", file, i) for i in range(*old_or_new))
        if span is None:
            self.falloc.pop(file, None)
        else:
            self.falloc[file] = span

    def falloc_sleepers(self, file: int) -> frozenset[str]:
        self.reads.add(("fwait", file))
        return self.falloc_waiters.get(file, frozenset())

    def set_falloc_sleepers(self, file: int, threads: frozenset[str]) -> None:
        self.writes.add(("fwait", file))
        if threads:
            self.falloc_waiters[file] = threads
        else:
            self.falloc_waiters.pop(file, None)

    def push_event(self, event: Event) -> None:
        self.reads.add(("uffd",))
        self.writes.add(("uffd",))
        self.queue = (*self.queue, event)

    def pop_event(self) -> Event | None:
        self.reads.add(("uffd",))
        if not self.queue:
            return None
        self.writes.add(("uffd",))
        event, self.queue = self.queue[0], self.queue[1:]
        return event

    def sleepers(self, vma: int, index: int) -> frozenset[str]:
        self.reads.add(("waiters", vma, index))
        return self.waiters.get((vma, index), frozenset())

    def set_sleepers(self, vma: int, index: int, threads: frozenset[str]) -> None:
        self.writes.add(("waiters", vma, index))
        if threads:
            self.waiters[(vma, index)] = threads
        else:
            self.waiters.pop((vma, index), None)

    def thread(self, name: str) -> ThreadState:
        self.reads.add(("thread", name))
        return self.threads[name]

    def set_thread(self, name: str, state: ThreadState) -> None:
        self.writes.add(("thread", name))
        self.threads[name] = state

    def snapped(self, vma: int, index: int) -> tuple[int | None, str] | None:
        self.reads.add(("snap", vma, index))
        return self.snap.get((vma, index))

    def set_snapped(self, vma: int, index: int, saved: tuple[int | None, str]) -> None:
        self.writes.add(("snap", vma, index))
        self.snap = {**self.snap, (vma, index): saved}

    def log(self, field: str) -> None:
        """Note a change of one of the server's records (they are shared state too)."""
        self.reads.add(("log", field))
        self.writes.add(("log", field))

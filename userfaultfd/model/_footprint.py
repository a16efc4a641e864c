"""The names of the shared objects a step's footprint lists: one small record per kind.

A step notes each object it reads or writes (:class:`._state.Step` does, in its accessors), and
the explorer's reduction compares those notes with what a thread may still touch
(:mod:`._future`). Both sides build their keys from the records here, so a key is spelt once:
a field the two disagreed on would be a type error, not a silent miss of the reduction.

Each record is a NamedTuple whose last field is its :class:`Kind`: tuples hash and compare in C
(footprints are built on every step), and the tag keeps two kinds with the same fields apart
(``Pte(0, 1) != Snap(0, 1)``), which bare tuples of the same values would not be.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple

__all__ = [
    "ALLOC",
    "UFFD",
    "Alloc",
    "Cache",
    "Data",
    "Falloc",
    "FallocWait",
    "Frame",
    "Inode",
    "Key",
    "Kind",
    "Log",
    "Page",
    "Pte",
    "Record",
    "Snap",
    "Thread",
    "Uffd",
    "Value",
    "Waiters",
]


class Kind(enum.Enum):
    """Which kind of object a key names."""

    PTE = "pte"
    CACHE = "cache"
    FRAME = "frame"
    DATA = "data"
    PAGE = "page"
    ALLOC = "alloc"
    INODE = "inode"
    FALLOC = "falloc"
    FWAIT = "fwait"
    UFFD = "uffd"
    WAITERS = "waiters"
    THREAD = "thread"
    VALUE = "value"
    SNAP = "snap"
    LOG = "log"

    # Keys are hashed on every step: identity hashing (members are singletons) keeps a key's
    # hash in C, where Enum's own __hash__ is a Python call (as state.Pc does).
    __hash__ = object.__hash__


class Record(enum.Enum):
    """The userfaultfd server's records (userspace state, shared by the server's threads)."""

    PROTECTED = "protected"
    SAVED = "saved"
    NOTIFIED = "notified"
    RESOLVED = "resolved"
    IMAGE = "image"
    #: The pager's store: what it wrote back, per file page.
    STORE = "store"
    #: The pager's dirty pages.
    DIRTY = "dirty"

    __hash__ = object.__hash__


class Pte(NamedTuple):
    """The PTE of page ``page`` of VMA ``vma``."""

    vma: int
    page: int
    kind: Literal[Kind.PTE] = Kind.PTE


class Cache(NamedTuple):
    """The page-cache slot of file page ``page`` of ``file``."""

    file: int
    page: int
    kind: Literal[Kind.CACHE] = Kind.CACHE


class Frame(NamedTuple):
    """A frame's record (contents, lock, flags)."""

    frame: int
    kind: Literal[Kind.FRAME] = Kind.FRAME


class Data(NamedTuple):
    """A change of a frame's contents: written, never read (invariants watch it)."""

    frame: int
    kind: Literal[Kind.DATA] = Kind.DATA


class Page(NamedTuple):
    """Whatever frame file page ``file_page`` will hold: how a future names a frame it cannot
    know yet (:func:`._future.abstract` turns a step's Frame and Data keys into these)."""

    file_page: int
    kind: Literal[Kind.PAGE] = Kind.PAGE


class Alloc(NamedTuple):
    """The frame allocation counter: two allocations do not commute (the numbers differ)."""

    kind: Literal[Kind.ALLOC] = Kind.ALLOC


class Inode(NamedTuple):
    """inode->i_private of ``file`` as a whole: whether a punch is in progress."""

    file: int
    kind: Literal[Kind.INODE] = Kind.INODE


class Falloc(NamedTuple):
    """Whether the punch in progress covers file page ``page`` (what shmem_fault asks)."""

    file: int
    page: int
    kind: Literal[Kind.FALLOC] = Kind.FALLOC


class FallocWait(NamedTuple):
    """The threads asleep in shmem_falloc_wait() on ``file``."""

    file: int
    kind: Literal[Kind.FWAIT] = Kind.FWAIT


class Uffd(NamedTuple):
    """The userfaultfd's message queue."""

    kind: Literal[Kind.UFFD] = Kind.UFFD


class Waiters(NamedTuple):
    """The threads asleep in handle_userfault() on page ``page`` of VMA ``vma``."""

    vma: int
    page: int
    kind: Literal[Kind.WAITERS] = Kind.WAITERS


class Thread(NamedTuple):
    """Thread ``name``'s state (its op, program counter and what that step needs)."""

    name: str
    kind: Literal[Kind.THREAD] = Kind.THREAD


class Value(NamedTuple):
    """What thread ``name``'s load returned: written, never read (invariants watch it)."""

    name: str
    kind: Literal[Kind.VALUE] = Kind.VALUE


class Snap(NamedTuple):
    """What the live snapshot saved for page ``page`` of VMA ``vma``."""

    vma: int
    page: int
    kind: Literal[Kind.SNAP] = Kind.SNAP


class Log(NamedTuple):
    """One of the server's records, as a whole."""

    record: Record
    kind: Literal[Kind.LOG] = Kind.LOG


#: Any footprint key.
Key = (
    Pte
    | Cache
    | Frame
    | Data
    | Page
    | Alloc
    | Inode
    | Falloc
    | FallocWait
    | Uffd
    | Waiters
    | Thread
    | Value
    | Snap
    | Log
)

#: The keys of the objects there is one of.
ALLOC = Alloc()
UFFD = Uffd()

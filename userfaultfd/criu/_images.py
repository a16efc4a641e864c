"""Reading CRIU's image files: inventory, pstree, mm (the VMAs) and pagemap; pages stay raw.

An image is a pair of u32 magics (the common magic, then the image's own; ``inventory.img``
has only its own), then records: a u32 length and a protobuf message of that length (see
_wire). ``pages-ID.img`` has no header: it is the raw pages of every PRESENT pagemap run, in
pagemap order. Constants mirror criu/include/magic.h, criu/include/image.h (VMA status bits),
criu/include/pagemap.h (PE_* flags) and images/*.proto (field numbers).

Every problem is a :class:`CriuImageError` naming the file, and the record where there is one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import final

from . import _wire

__all__ = [
    "CriuImageError",
    "Images",
    "Inventory",
    "PagemapEntry",
    "PstreeEntry",
    "Vma",
]

# criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319  # Kronshtadt
IMG_SERVICE_MAGIC = 0x55105940  # Zlatograd
INVENTORY_MAGIC = 0x58313116  # Veliky Novgorod
PSTREE_MAGIC = 0x50273030  # Kyiv
MM_MAGIC = 0x57492820  # Pskov
CORE_MAGIC = 0x55053847  # Kolomna
PAGEMAP_MAGIC = 0x56084025  # Vladimir

# compel/include/uapi/task-state.h (criu/include/pid.h): TaskCoreEntry.task_state
TASK_ALIVE = 0x01
TASK_DEAD = 0x02  # a zombie at dump time (cr-dump.c, dump_one_zombie): no mm, pagemap or pages
TASK_STOPPED = 0x03

# criu/include/pagemap.h
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# criu/include/image.h: VmaEntry.status
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_VVAR = 1 << 12
# <sys/mman.h>: VmaEntry.flags
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_LOCKED = 0x2000

_U32 = struct.Struct("<I")
#: VmaEntry fields read (images/vma.proto): start, end, prot, flags, status.
_VMA_FIELDS = ((1, "start"), (2, "end"), (5, "prot"), (6, "flags"), (7, "status"))
#: A record longer than this is a corrupt length, not a message (CRIU's are a few KiB).
_MAX_RECORD = 64 << 20


class CriuImageError(ValueError):
    """An image file that is missing, truncated or malformed; the message names the file."""


@final
@dataclass(frozen=True, slots=True)
class Inventory:
    """inventory.img: the image set's version (2 for every CRIU since 1.x)."""

    img_version: int


@final
@dataclass(frozen=True, slots=True)
class PstreeEntry:
    """One task of pstree.img."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


@final
@dataclass(frozen=True, slots=True)
class Vma:
    """One VMA of mm-PID.img: [start, end), its mmap prot and flags, CRIU's status bits."""

    start: int
    end: int
    prot: int
    flags: int
    status: int

    @property
    def lazy(self) -> bool:
        """Whether CRIU restores this VMA lazily (criu/include/vma.h, vma_entry_can_be_lazy):
        private anonymous, not locked, not the vDSO, vvar or vsyscall pages."""
        return (
            bool(self.flags & MAP_ANONYMOUS)
            and bool(self.flags & MAP_PRIVATE)
            and not self.flags & MAP_LOCKED
            and self.status & VMA_AREA_VDSO != VMA_AREA_VDSO
            and self.status & VMA_AREA_VSYSCALL != VMA_AREA_VSYSCALL
            # [vvar] comes from the new kernel's vDSO; the restorer never registers it.
            and self.status & VMA_AREA_VVAR != VMA_AREA_VVAR
        )


@final
@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """One run of pagemap-PID.img: ``nr_pages`` pages from ``vaddr``, with PE_* ``flags``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        """Its pages are in this dump's pages image."""
        return bool(self.flags & PE_PRESENT)

    @property
    def in_parent(self) -> bool:
        """Its pages are in a parent dump's images (an incremental dump)."""
        return bool(self.flags & PE_PARENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)


@final
class Images:
    """A CRIU images directory, read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CriuImageError(f"{self.path}: not a CRIU images directory (no such directory)")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def inventory(self) -> Inventory:
        name = "inventory.img"
        records = list(self._records(name, INVENTORY_MAGIC, common=False))
        if len(records) != 1:
            raise CriuImageError(f"{self.file(name)}: {len(records)} records, expected 1")
        index, fields = records[0]
        return Inventory(self._int(name, index, fields, 1, "img_version"))

    def pstree(self) -> list[PstreeEntry]:
        """The tasks, in the order the restore sends their descriptors."""
        name = "pstree.img"
        tasks = []
        for index, fields in self._records(name, PSTREE_MAGIC):
            pick = [self._int(name, index, fields, n, what)
                    for n, what in ((1, "pid"), (2, "ppid"), (3, "pgid"), (4, "sid"))]  # fmt: skip
            try:
                threads = tuple(_wire.packed(fields, 5, "threads"))
            except _wire.WireError as err:
                raise CriuImageError(f"{self.file(name)}: record {index}: {err}") from None
            tasks.append(PstreeEntry(pick[0], pick[1], pick[2], pick[3], threads))
        if not tasks:
            raise CriuImageError(f"{self.file(name)}: no tasks")
        return tasks

    def task_state(self, pid: int) -> int:
        """Task ``pid``'s state at dump time (core-PID.img: CoreEntry.tc.task_state), one of
        TASK_ALIVE, TASK_DEAD (a zombie: CRIU writes no mm, pagemap or pages for it) or
        TASK_STOPPED."""
        name = f"core-{pid}.img"
        records = list(self._records(name, CORE_MAGIC))
        if len(records) != 1:
            raise CriuImageError(f"{self.file(name)}: {len(records)} records, expected 1")
        index, core = records[0]
        tc = core.get(3)
        if not tc or not isinstance(tc[-1], bytes):
            raise CriuImageError(f"{self.file(name)}: record {index}: no task core (field tc)")
        try:
            fields = _wire.decode(tc[-1])
        except _wire.WireError as err:
            raise CriuImageError(f"{self.file(name)}: record {index}: tc: {err}") from None
        return self._int(name, f"record {index}, tc", fields, 1, "task_state")

    def zombie(self, pid: int) -> bool:
        """Whether task ``pid`` was a zombie at dump time (nothing of its memory was dumped).
        Without core-PID.img (CRIU always writes one; images made by hand may not) the task
        is taken as live: its memory images must then be there."""
        if not os.path.exists(self.file(f"core-{pid}.img")):
            return False
        return self.task_state(pid) == TASK_DEAD

    def vmas(self, pid: int) -> list[Vma]:
        """The VMAs of task ``pid`` (mm-PID.img), in address order."""
        name = f"mm-{pid}.img"
        records = list(self._records(name, MM_MAGIC))
        if len(records) != 1:
            raise CriuImageError(f"{self.file(name)}: {len(records)} records, expected 1")
        _, mm = records[0]
        vmas: list[Vma] = []
        for number, raw in enumerate(mm.get(14, [])):
            where = f"record 0, vma {number}"
            if not isinstance(raw, bytes):
                raise CriuImageError(f"{self.file(name)}: {where}: not a message")
            try:
                fields = _wire.decode(raw)
            except _wire.WireError as err:
                raise CriuImageError(f"{self.file(name)}: {where}: {err}") from None
            start, end, prot, flags, status = self._ints(name, where, fields, _VMA_FIELDS)
            if start >= end or start % 4096 or end % 4096:
                raise CriuImageError(
                    f"{self.file(name)}: {where}: bounds 0x{start:x}-0x{end:x} are not a "
                    "page-aligned range"
                )
            if vmas and start < vmas[-1].end:
                raise CriuImageError(
                    f"{self.file(name)}: {where}: 0x{start:x} overlaps or precedes the VMA "
                    f"before it (ends 0x{vmas[-1].end:x})"
                )
            vmas.append(Vma(start, end, prot, flags, status))
        return vmas

    def pagemap(self, pid: int) -> tuple[int, list[PagemapEntry]]:
        """The pages image id and the runs of task ``pid`` (pagemap-PID.img)."""
        name = f"pagemap-{pid}.img"
        records = self._records(name, PAGEMAP_MAGIC)
        head = next(records, None)
        if head is None:
            raise CriuImageError(f"{self.file(name)}: no head record")
        pages_id = self._int(name, 0, head[1], 1, "pages_id")
        entries: list[PagemapEntry] = []
        for index, fields in records:
            (vaddr,) = self._ints(name, index, fields, ((1, "vaddr"),))
            # CRIU 4.1.1 writes the count in field 2 (compat_nr_pages); newer ones in field 5.
            count = fields.get(5) or fields.get(2)
            if not count or not isinstance(count[-1], int):
                raise CriuImageError(f"{self.file(name)}: record {index}: no page count")
            nr_pages = count[-1]
            if 3 in fields or 4 in fields:
                flags = self._int(name, index, fields, 4, "flags", default=0)
                if self._int(name, index, fields, 3, "in_parent", default=0):
                    flags |= PE_PARENT
            else:  # images older than the flags field: present unless in the parent
                flags = PE_PRESENT
            if flags & PE_PARENT and flags & PE_PRESENT:
                raise CriuImageError(
                    f"{self.file(name)}: record {index}: flags 0x{flags:x} say both present "
                    "and in the parent"
                )
            if vaddr % 4096 or nr_pages <= 0:
                raise CriuImageError(
                    f"{self.file(name)}: record {index}: vaddr 0x{vaddr:x}, {nr_pages} pages "
                    "is not a page-aligned run"
                )
            if entries and vaddr < entries[-1].vaddr + entries[-1].nr_pages * 4096:
                raise CriuImageError(
                    f"{self.file(name)}: record {index}: vaddr 0x{vaddr:x} overlaps or "
                    "precedes the run before it"
                )
            entries.append(PagemapEntry(vaddr, nr_pages, flags))
        return pages_id, entries

    def pages_path(self, pages_id: int) -> str:
        return self.file(f"pages-{pages_id}.img")

    # -- records ---------------------------------------------------------------------------------
    def _int(
        self, name: str, index: int | str, fields: _wire.Fields, number: int, what: str,
        *, default: int | None = None,
    ) -> int:  # fmt: skip
        try:
            return _wire.first(fields, number, what, default=default)
        except _wire.WireError as err:
            where = f"record {index}" if isinstance(index, int) else index
            raise CriuImageError(f"{self.file(name)}: {where}: {err}") from None

    def _ints(
        self, name: str, index: int | str, fields: _wire.Fields,
        wanted: tuple[tuple[int, str], ...],
    ) -> list[int]:  # fmt: skip
        """The int fields ``wanted`` (number, name): read at once when each is there and an
        int (a dump of 50,000 VMAs is read in a fraction of a second), else through
        :meth:`_int`, which says what is wrong."""
        try:
            ints = [v for number, _ in wanted if isinstance(v := fields[number][-1], int)]
        except KeyError:
            ints = []
        if len(ints) == len(wanted):
            return ints
        return [self._int(name, index, fields, number, what) for number, what in wanted]

    def _records(
        self, name: str, magic: int, *, common: bool = True
    ) -> Iterator[tuple[int, _wire.Fields]]:
        path = self.file(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CriuImageError(f"{path}: missing from the images directory") from None
        except OSError as err:
            raise CriuImageError(f"{path}: cannot be read: {err.strerror}") from None
        at = 0
        wanted = (IMG_COMMON_MAGIC, magic) if common else (magic,)
        for number, expected in enumerate(wanted):
            if len(data) < at + 4:
                raise CriuImageError(f"{path}: truncated: {len(data)} bytes, no image header")
            (found,) = _U32.unpack_from(data, at)
            if number == 0 and common and found == IMG_SERVICE_MAGIC:
                found = IMG_COMMON_MAGIC
            if found != expected:
                raise CriuImageError(
                    f"{path}: magic 0x{found:08x}, expected 0x{expected:08x}: not a "
                    f"{name.split('-')[0].removesuffix('.img')} image"
                )
            at += 4
        index = 0
        while at < len(data):
            if len(data) - at < 4:
                raise CriuImageError(
                    f"{path}: record {index}: truncated: {len(data) - at} bytes of its length"
                )
            (length,) = _U32.unpack_from(data, at)
            at += 4
            if length > _MAX_RECORD or at + length > len(data):
                raise CriuImageError(
                    f"{path}: record {index}: truncated: {length} bytes announced at offset "
                    f"{at - 4}, {len(data) - at} left"
                )
            try:
                fields = _wire.decode(data[at : at + length])
            except _wire.WireError as err:
                raise CriuImageError(f"{path}: record {index}: {err}") from None
            yield index, fields
            at += length
            index += 1

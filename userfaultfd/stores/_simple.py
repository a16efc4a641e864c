"""Stores over memory and over local files."""

from __future__ import annotations

import mmap
import os
from contextlib import ExitStack, suppress

from .._buffer import pinned
from ._base import Store, StoreError

__all__ = ["BytesStore", "FileStore"]

_MADV_POPULATE_READ = 22  # include/uapi/asm-generic/mman-common.h; not in the mmap module


class BytesStore(Store):
    """Any bytes-like object (bytes, bytearray, memoryview, mmap, NumPy array)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")

    @property
    def size(self) -> int:
        return len(self._data)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        if offset < 0:
            raise StoreError(f"offset {offset} is negative")
        chunk = self._data[offset : offset + len(buffer)]
        buffer[: len(chunk)] = chunk
        return len(chunk)


class FileStore(Store):
    """A local file, read with pread (never read whole), or mapped for :meth:`address`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._map: mmap.mmap | None = None
        self._pins = ExitStack()
        self._base = 0

    def address(self, offset: int, length: int) -> int | None:
        if offset < 0 or offset + length > self._size:
            return None
        if self._map is None:
            self._map = mmap.mmap(self._fd, self._size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            self._base, _ = self._pins.enter_context(pinned(self._map))
        # Map the source pages with one call, rather than one fault per 64 KiB during the copy.
        page = mmap.PAGESIZE
        start = offset - offset % page
        with suppress(OSError):  # MADV_POPULATE_READ is Linux 5.14+; without it, faults do
            self._map.madvise(_MADV_POPULATE_READ, start, min(self._size - start, length + page))
        return self._base + offset

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        done = 0
        while done < len(buffer):
            try:
                got = os.preadv(self._fd, [buffer[done:]], offset + done)
            except OSError as err:
                raise StoreError(f"{self.path}: reading at {offset + done}: {err.strerror}",
                                 code=err.errno or 5) from err  # fmt: skip
            if got == 0:
                break  # end of file
            done += got
        return done

    def reopen(self) -> FileStore:
        return FileStore(self.path)  # a mapping of its own in the handler process

    def close(self) -> None:
        self._pins.close()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<FileStore {self.path!r} {self._size} bytes>"

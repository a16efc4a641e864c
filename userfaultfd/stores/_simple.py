"""Stores over memory and over local files."""

from __future__ import annotations

import os

from ._base import Store, StoreError

__all__ = ["BytesStore", "FileStore"]


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
    """A local file, read with pread (never read whole)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<FileStore {self.path!r} {self._size} bytes>"

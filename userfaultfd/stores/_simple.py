"""Stores over memory and over local files."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from contextlib import ExitStack, suppress

from .. import _libc
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

    def read_range(self, offset: int, view: memoryview) -> None:
        view[:] = self._data[offset : offset + len(view)]


class FileStore(Store):
    """A local file, read with pread (never read whole), or mapped for :meth:`address`.

    Pinned to the open file, not to its path: the store keeps the descriptor it opened, and
    :meth:`reopen` duplicates that descriptor, so a file replaced (``os.replace``) or unlinked
    after the open is still read as it was, and the size recorded at the open stays the size.
    ``FileStore.from_fd(fd)`` makes one from a descriptor the caller opened. A file truncated
    below a range inside the recorded size cannot give those bytes: :meth:`read_into` raises
    :class:`StoreError` (ESTALE) and :meth:`address` answers None for it (it checks the current
    size with one fstat), so the handler poisons the page rather than mapping zeros. Writes into
    the same file in place are not detected: pin the bytes by replacing files, not editing them.
    ``writable=True`` opens it for :meth:`write_from` too (an out-of-core array's write-back).
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(os.fspath(path), flags)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, os.fspath(path), size)

    @classmethod
    def from_fd(cls, fd: int, *, path: str | None = None) -> FileStore:
        """A store over the file open at ``fd``, which stays the caller's: the store reads a
        duplicate (close-on-exec) and closes only that. ``path`` names the file in error
        messages (default: what /proc/self/fd says, as it was when the store was made). The size
        is the file's size now."""
        if path is None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = f"fd {fd}"
        dup = os.dup(fd)  # os.dup's copy is non-inheritable: close-on-exec
        try:
            size = os.fstat(dup).st_size
        except BaseException:
            os.close(dup)
            raise
        store = cls.__new__(cls)
        store._adopt(dup, path, size)
        return store

    def _adopt(self, fd: int, path: str, size: int) -> None:
        self.path = path
        self._fd = fd
        self._size = size
        self._map: mmap.mmap | None = None
        self._pins = ExitStack()
        self._base = 0

    def _current_size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as err:
            message = f"{self.path}: fstat: {err.strerror}"
            raise StoreError(err.errno or errno.EIO, message) from err

    def address(self, offset: int, length: int) -> int | None:
        if offset < 0 or offset + length > self._size or self._fd < 0:
            return None
        # A mapped page past the file's current end would SIGBUS the copy: fall back to
        # read_into, which raises. (A truncation between this check and the copy kills the
        # handler instead; its restart comes back here and sees the new size.)
        current = self._current_size()
        if current < offset + length:
            return None
        if not self._mapping(current) or self._map is None or offset + length > len(self._map):
            return None
        # Map the source pages with one call, rather than one fault per 64 KiB during the copy.
        page = mmap.PAGESIZE
        start = offset - offset % page
        with suppress(OSError):  # MADV_POPULATE_READ is Linux 5.14+; without it, faults do
            populate = min(len(self._map) - start, length + page)
            self._map.madvise(_MADV_POPULATE_READ, start, populate)
        return self._base + offset

    def _mapping(self, current: int) -> bool:
        """Map the file (once), as far as it is ``current`` bytes long; whether it is mapped."""
        if self._map is None:
            # The recorded size, or less if the file shrank (mmap refuses more than it holds).
            try:
                self._map = mmap.mmap(
                    self._fd, min(self._size, current), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ
                )
            except (OSError, ValueError):
                return False
            self._base, _ = self._pins.enter_context(pinned(self._map))
        return True

    def mapped(self) -> list[tuple[int, int, int]] | None:
        if self._fd < 0 or self._size == 0 or not self._mapping(self._current_size()):
            return None
        assert self._map is not None
        page = mmap.PAGESIZE
        return [(0, -(-len(self._map) // page) * page, self._base)]

    def fileno(self) -> int:
        """The descriptor of the file this store opened (what a direct mapping maps)."""
        if self._fd < 0:
            raise StoreError(errno.EBADF, f"{self.path}: the store is closed")
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, view: memoryview) -> None:
        if self._fd < 0:
            raise StoreError(errno.EBADF, f"{self.path}: the store is closed")
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as err:
                where = f"{self.path}: reading at {offset + done}"
                raise StoreError(err.errno or errno.EIO, f"{where}: {err.strerror}") from err
            if got == 0:
                raise StoreError(
                    errno.ESTALE,
                    f"{self.path}: reading at {offset + done}: the file ends there now"
                    f" ({self._current_size()} bytes), it was {self._size} bytes when opened",
                )
            done += got

    def will_need(self, offset: int, length: int) -> None:
        if self._fd >= 0 and 0 <= offset < self._size:
            with suppress(OSError):
                os.posix_fadvise(self._fd, offset, min(length, self._size - offset),
                                 os.POSIX_FADV_WILLNEED)  # fmt: skip

    def dont_need(self, offset: int, length: int, *, wait: bool = False) -> None:
        if self._fd < 0:
            return
        flags = _libc.SYNC_FILE_RANGE_WRITE
        if wait:
            flags |= _libc.SYNC_FILE_RANGE_WAIT_BEFORE | _libc.SYNC_FILE_RANGE_WAIT_AFTER
        with suppress(OSError):
            _libc.sync_file_range(self._fd, offset, length, flags)
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    @property
    def writable(self) -> bool:
        """Whether the file was opened for writing (``FileStore(path, writable=True)``)."""
        if self._fd < 0:
            return False
        return fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR

    def write_from(self, offset: int, data: memoryview) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise StoreError(errno.EINVAL, f"{self.path}: a write at {offset}+{len(data)} is "
                             f"outside its {self._size} bytes")  # fmt: skip
        done = 0
        while done < len(data):
            try:
                done += os.pwritev(self._fd, [data[done:]], offset + done)
            except OSError as err:
                where = f"{self.path}: writing at {offset + done}"
                raise StoreError(err.errno or errno.EIO, f"{where}: {err.strerror}") from err

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise StoreError(err.errno or errno.EIO, f"{self.path}: fsync: {err.strerror}") from err

    def reopen(self) -> FileStore:
        """A store over the same open file (a duplicate descriptor, with a mapping of its own),
        not over whatever the path names now."""
        if self._fd < 0:
            raise StoreError(errno.EBADF, f"{self.path}: the store is closed")
        store = FileStore.__new__(FileStore)
        store._adopt(os.dup(self._fd), self.path, self._size)
        return store

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

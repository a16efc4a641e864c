"""A local directory of fetched chunks, shared by processes, with a size cap.

A content-addressed pack's chunk is named by its hash, so a cached copy is good exactly when it
still hashes to its name: the reader decodes and checks every chunk it takes from here, as it does
one fetched, and a cached copy that fails (a disk error, a file edited by hand) is deleted and
fetched again. Nothing here needs a lock between processes:

- a chunk is written to a temporary name (pid, thread) and renamed into place, so a reader sees a
  whole file or none, and two processes caching the same chunk write the same bytes;
- eviction deletes the least recently used files (a hit touches the file's mtime); a reader that
  opened a file before it was deleted still reads it, one that comes after misses and fetches;
- the total is learned by scanning the directory. Each process adds what it writes to the last
  scan's total and scans again (evicting down to 90% of the cap) when that passes the cap or when
  it has written a tenth of the cap since: with P processes writing, the directory can pass the
  cap by at most (P - 1) tenths of it, and never stays above it.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from .._replacing import replacing
from ._base import StoreError

__all__ = ["ChunkCache"]

_STALE_TEMP = 3600.0  # seconds: a temporary file this old was left by a process that died


class ChunkCache:
    """Chunks kept in ``directory`` (made if missing), at most about ``max_bytes`` of them.

    Give the same one to :func:`open_store` (``cache=``) in every process that reads the same
    packs: the handler and a restarted handler, or many programs on one machine.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_bytes = max_bytes
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._total: int | None = None  # as of the last scan, plus this process's writes since
        self._written = 0  # bytes written since the last scan

    def _path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"{key!r} is not a chunk name")
        return os.path.join(self.directory, key)

    def get(self, key: str) -> bytes | None:
        """The cached bytes of ``key``, or None. The caller checks them (see :meth:`discard`)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # most recently used
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(err.errno or errno.EIO, f"chunk cache {path}: {err.strerror}") from err
        return data

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data`` (already checked by the caller) as ``key``, then evict if over the cap.
        A chunk larger than the whole cap is not kept."""
        if len(data) > self.max_bytes:
            return
        path = self._path(key)
        try:
            with replacing(path, durable=False) as out:  # a lost cache entry is only a miss
                out.write(data)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return  # a full disk makes a cache miss, not a failed read
            raise StoreError(err.errno or errno.EIO, f"chunk cache {path}: {err.strerror}") from err
        with self._lock:
            if self._total is None:
                self._total = self._scan()[0]
            else:
                self._total += len(data)
            self._written += len(data)
            if self._total > self.max_bytes or self._written * 10 > self.max_bytes:
                self._evict()

    def discard(self, key: str) -> None:
        """Forget ``key`` (its cached bytes were wrong)."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def _scan(self) -> tuple[int, list[tuple[float, int, str]]]:
        """(total bytes, [(mtime, size, path)]) of the cached chunks; old temporary files go."""
        total, files = 0, []
        now = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # evicted by another process just now
                if entry.name.startswith("."):
                    if now - st.st_mtime > _STALE_TEMP:
                        self._unlink(entry.path)
                    continue
                total += st.st_size
                files.append((st.st_mtime, st.st_size, entry.path))
        return total, files

    def _evict(self) -> None:
        """Scan, and delete the least recently used chunks until at most 90% of the cap."""
        total, files = self._scan()
        if total > self.max_bytes:
            files.sort()
            goal = self.max_bytes * 9 // 10
            for _mtime, size, path in files:
                if total <= goal:
                    break
                self._unlink(path)
                total -= size
        self._total, self._written = total, 0

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def size(self) -> int:
        """Bytes in the cache now (a scan)."""
        return self._scan()[0]

    def reopen(self) -> ChunkCache:
        """The same directory and cap, with state of its own (a lock made after fork)."""
        return ChunkCache(self.directory, self.max_bytes)

    def __repr__(self) -> str:
        return f"<ChunkCache {self.directory!r} max {self.max_bytes} bytes>"

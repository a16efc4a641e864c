"""A local directory of fetched chunks, shared by processes and users, with a size cap.

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

A cache only ever spares requests (issue 21): it never fails a read. Whatever goes wrong with it
(a directory that is read-only or cannot be made, entries of another user that this one may not
read, touch, replace or evict, an entry that is a directory or a FIFO, a full disk) is a miss,
counted in :attr:`ChunkCache.errors` and logged at debug level on ``userfaultfd.stores``, and the
frame is fetched from the store. Only an entry's content is the reader's business: it checks
the hash and :meth:`ChunkCache.discard` s a bad copy. Entries are opened without following
symbolic links and without blocking (a FIFO planted in a shared directory is a miss, not a hang),
and written under an unpredictable temporary name created exclusively (no one can plant a link
there for a privileged writer to follow).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
import time

__all__ = ["ChunkCache"]

_log = logging.getLogger("userfaultfd.stores")

_STALE_TEMP = 3600.0  # seconds: a temporary file this old was left by a process that died
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ChunkCache:
    """Chunks kept in ``directory`` (made if missing), at most about ``max_bytes`` of them.

    Give the same one to :func:`open_store` (``cache=``) in every process that reads the same
    packs: the handler and a restarted handler, or many programs on one machine.

    A cache never fails a read: an entry that cannot be read, written, touched or evicted (a
    read-only or missing directory, permissions, an entry that is not a regular file, a full
    disk) is a miss, counted in :attr:`errors` and logged at debug level, and the frame comes
    from the store. :attr:`hits`, :attr:`misses` and :attr:`errors` count this object's
    lookups and failures (each process has its own: a handler's cache is a :meth:`reopen`).

    Shared by several users: each needs to read the others' entries and to write the
    directory. Make the directory owned by a group they all belong to, mode 2775 (setgid: new
    entries take that group), e.g. ``install -d -m 2775 -g uffd /var/cache/uffd``; entries are
    created with mode 0666 less the writer's umask, so with umask 002 (0664 entries) every member
    also refreshes (the LRU touch) and evicts the others' entries, and with umask 022 (0644) they
    read and evict them but do not refresh them. A sticky directory (mode 1777, as /tmp) also
    works for reading, but there no user can evict or replace another's entries, so the cap is
    kept only over each user's own. A user who may only read the directory uses its entries and
    adds none.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # guards the total and the counters
        self._total: int | None = None  # as of the last scan, plus this process's writes since
        self._written = 0  # bytes written since the last scan
        #: Lookups that found a readable entry.
        self.hits = 0
        #: Lookups that found none (absent, or one that could not be read: see :attr:`errors`).
        self.misses = 0
        #: Operations on the directory that failed and were passed over (each logged at debug).
        self.errors = 0
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            self._failed("make the directory", self.directory, err)

    def _path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"{key!r} is not a chunk name")
        return os.path.join(self.directory, key)

    def _failed(self, what: str, path: str, err: OSError) -> None:
        """Count and log a cache operation that failed; the caller goes on without it."""
        with self._lock:
            self.errors += 1
        _log.debug("chunk cache: cannot %s %s: %s; passed over", what, path, err)

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def get(self, key: str) -> bytes | None:
        """The cached bytes of ``key``, or None (a miss: absent or unusable). The caller checks
        them (see :meth:`discard`)."""
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            self._count(False)
            return None
        except OSError as err:  # permissions, a symbolic link (ELOOP), ...
            self._failed("open", path, err)
            self._count(False)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
        except OSError as err:
            self._failed("read", path, err)
            self._count(False)
            return None
        finally:
            os.close(fd)
        try:
            os.utime(path)  # most recently used
        except FileNotFoundError:
            pass  # evicted since: the bytes are still good
        except OSError as err:  # another user's entry: read, not refreshed
            self._failed("touch", path, err)
        self._count(True)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data`` (already checked by the caller) as ``key``, then evict if over the cap.
        A chunk larger than the whole cap is not kept, nor one that cannot be written."""
        if len(data) > self.max_bytes:
            return
        path = self._path(key)
        if not self._write(path, data):
            return
        with self._lock:
            self._written += len(data)
            if self._total is None:
                self._evict()  # the first write: a scan learns the total
            else:
                self._total += len(data)
                if self._total > self.max_bytes or self._written * 10 > self.max_bytes:
                    self._evict()

    def _write(self, path: str, data: bytes) -> bool:
        """Write ``data`` to a new temporary file and rename it to ``path`` (not durable: a
        lost entry is only a miss); whether it is there now."""
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        except OSError as err:
            self._failed("write", tmp, err)
            return False
        try:
            with open(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except OSError as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._failed("write", path, err)
            return False
        return True

    def discard(self, key: str) -> None:
        """Forget ``key`` (its cached bytes were wrong); one that cannot be removed is left
        (counted in :attr:`errors`): its next lookup fails the check again and fetches."""
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._failed("remove", path, err)

    def _scan(self) -> tuple[int, list[tuple[float, int, str]]]:
        """(total bytes, [(mtime, size, path)]) of the cached chunks; old temporary files go.
        Raises OSError when the directory cannot be listed."""
        total, files = 0, []
        now = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # evicted by another process just now
                except OSError:
                    continue
                if entry.name.startswith("."):
                    if now - st.st_mtime > _STALE_TEMP:
                        _remove(entry.path)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # not an entry this cache wrote: never a miss's cost to remove
                total += st.st_size
                files.append((st.st_mtime, st.st_size, entry.path))
        return total, files

    def _evict(self) -> None:
        """Scan, and delete the least recently used chunks until at most 90% of the cap (the
        ones this user may delete). Called with the lock held."""
        try:
            total, files = self._scan()
        except OSError as err:
            self.errors += 1
            _log.debug("chunk cache: cannot list %s: %s; not evicting", self.directory, err)
            self._written = 0
            return
        if total > self.max_bytes:
            files.sort()
            goal = self.max_bytes * 9 // 10
            for _mtime, size, path in files:
                if total <= goal:
                    break
                try:
                    _remove(path)
                except OSError as err:  # another user's, in a sticky directory; a read-only one
                    self.errors += 1
                    _log.debug("chunk cache: cannot evict %s: %s; kept", path, err)
                    continue
                total -= size
        self._total, self._written = total, 0

    def size(self) -> int:
        """Bytes in the cache now (a scan)."""
        return self._scan()[0]

    def reopen(self) -> ChunkCache:
        """The same directory and cap, with state of its own (a lock and counters made after
        fork)."""
        return ChunkCache(self.directory, self.max_bytes)

    def __repr__(self) -> str:
        return f"<ChunkCache {self.directory!r} max {self.max_bytes} bytes>"


def _remove(path: str) -> None:
    """Remove ``path`` if it is still there (another process may have evicted it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

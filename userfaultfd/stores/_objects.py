"""Where a content-addressed pack's objects live: a local directory, an HTTP prefix or any other
fsspec prefix. The one reader (and writer) of them: the pack's reader fetches byte ranges of its
bundles here, its writer lists, reads and puts bundles, manifests and the index.

An object is written whole or not at all: locally under a temporary name renamed into place,
remotely by one PUT (S3 and memory:// make an object visible only once complete); HTTP is read
only. An object never changes once written (its name is its hash), so objects need no version
pinning: the reader checks every frame against its hash instead. A remote prefix is read with the
deadlines, retries and error mapping of every remote store (stores/_retries.py); an HTTP prefix
whose options the direct reader honours (stores/_http.py) without fsspec.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .._location import is_http, is_url, local_path
from .._replacing import replacing
from ._base import PARALLEL_REQUESTS, StoreError
from ._http import RangeReader, direct_reader
from ._retries import call_with_retries

__all__ = ["Objects", "open_objects"]


class Objects:
    """Named immutable objects under one prefix."""

    #: Where they are (a directory path or a URL ending in "/"), for messages.
    where: str
    #: How many :meth:`read` and :meth:`get` calls are useful at once (a remote prefix: many).
    parallel_reads: int = 1

    def read(self, name: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of object ``name``, in one request; StoreError if there are
        fewer."""
        data = self._read(name, start, stop)
        if len(data) != stop - start:
            raise StoreError(errno.EIO, f"{self.where}{name}: bytes {start}..{stop}: got "
                             f"{len(data)} bytes (the object is shorter than that)")  # fmt: skip
        return data

    def _read(self, name: str, start: int, stop: int) -> bytes:
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        """The whole object; StoreError (ENOENT when it is not there)."""
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        """Write the object, whole or not at all."""
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """The objects there now, name -> size in bytes (none: empty)."""
        raise NotImplementedError

    def reopen(self) -> Objects:
        """A handle usable in this process (after fork)."""
        return self

    def close(self) -> None:
        """Release what the handle holds."""


class _Local(Objects):
    def __init__(self, directory: str) -> None:
        self.where = directory.rstrip("/") + "/"
        self._directory = directory

    def _read(self, name: str, start: int, stop: int) -> bytes:
        path = os.path.join(self._directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, stop - start, start)
            finally:
                os.close(fd)
        except OSError as err:
            raise StoreError(err.errno or errno.EIO, f"{path}: {err.strerror}") from err

    def get(self, name: str) -> bytes:
        path = os.path.join(self._directory, name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise StoreError(err.errno or errno.EIO, f"{path}: {err.strerror}") from err

    def put(self, name: str, data: bytes) -> None:
        os.makedirs(self._directory, exist_ok=True)
        path = os.path.join(self._directory, name)
        with replacing(path) as out:
            out.write(data)

    def sizes(self) -> dict[str, int]:
        try:
            with os.scandir(self._directory) as entries:
                return {e.name: e.stat().st_size for e in entries if not e.name.startswith(".")}
        except FileNotFoundError:
            return {}


class _Http(Objects):
    """Objects under an http(s):// prefix, read with ranged GETs straight into a buffer; no
    fsspec. Read only: a pack is written locally or to S3."""

    parallel_reads = PARALLEL_REQUESTS

    def __init__(
        self, prefix: str, options: dict[str, Any], tries: int, backoff: float, timeout: float
    ) -> None:
        self.where = prefix.rstrip("/") + "/"
        self._options = options
        self._tries, self._backoff, self._timeout = tries, backoff, timeout
        reader = direct_reader(self.where, options, timeout)
        assert reader is not None, "open_objects checked the options"
        self._reader: RangeReader | None = reader

    def _read(self, name: str, start: int, stop: int) -> bytes:
        reader = self._reader
        if reader is None:
            raise StoreError(errno.EBADF, f"{self.where}: the store is closed")
        buffer = bytearray(stop - start)
        what = f"{name} bytes {start}..{stop}"
        call_with_retries(self.where, what, lambda: reader.get_into(start, memoryview(buffer),
                          {}, name), self._tries, self._backoff)  # fmt: skip
        return bytes(buffer)

    def get(self, name: str) -> bytes:
        raise self._read_only()

    def put(self, name: str, data: bytes) -> None:
        raise self._read_only()

    def sizes(self) -> dict[str, int]:
        raise self._read_only()

    def _read_only(self) -> StoreError:
        return StoreError(errno.EROFS, f"{self.where}: over HTTP a pack is read, by ranges only")

    def reopen(self) -> _Http:
        return _Http(self.where, self._options, self._tries, self._backoff, self._timeout)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None


class _Remote(Objects):
    """Objects under an fsspec URL prefix, fetched with the same deadlines, retries and error
    mapping as :class:`FsspecStore`."""

    parallel_reads = PARALLEL_REQUESTS

    def __init__(
        self, prefix: str, options: dict[str, Any], tries: int, backoff: float, timeout: float
    ) -> None:
        from ._fsspec import connect, with_timeouts  # only for a URL: fsspec adds an at-fork hook

        self.where = prefix.rstrip("/") + "/"
        self._raw_options = options
        self._tries, self._backoff, self._timeout = tries, backoff, timeout
        self._options = with_timeouts(prefix, timeout, options)
        self._fs: Any
        self._fs, self._path = connect(self.where, self._options)
        self._path = self._path.rstrip("/")

    def _call(self, what: str, fn: Any) -> Any:
        if self._fs is None:
            raise StoreError(errno.EBADF, f"{self.where}: the store is closed")
        return call_with_retries(self.where, what, fn, self._tries, self._backoff)

    def _read(self, name: str, start: int, stop: int) -> bytes:
        fs, path = self._fs, f"{self._path}/{name}"
        data: bytes = self._call(f"{name} bytes {start}..{stop}",
                                 lambda: fs.cat_file(path, start=start, end=stop))  # fmt: skip
        return bytes(data)

    def get(self, name: str) -> bytes:
        data: bytes = self._call(name, lambda: self._fs.cat_file(f"{self._path}/{name}"))
        return data

    def put(self, name: str, data: bytes) -> None:
        self._call(f"writing {name}", lambda: self._fs.pipe_file(f"{self._path}/{name}", data))

    def sizes(self) -> dict[str, int]:
        def listing() -> list[dict[str, Any]]:
            try:
                found: list[dict[str, Any]] = self._fs.ls(self._path, detail=True)
            except FileNotFoundError:
                return []
            return found

        return {
            entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
            for entry in self._call("listing", listing)
            if entry.get("type") != "directory"
        }

    def reopen(self) -> _Remote:
        return _Remote(self.where, self._raw_options, self._tries, self._backoff, self._timeout)

    def close(self) -> None:
        self._fs = None


def open_objects(
    prefix: str,
    options: dict[str, Any] | None = None,
    *,
    tries: int = 3,
    backoff: float = 0.2,
    timeout: float = 10.0,
) -> Objects:
    """The objects under ``prefix``: a local directory (a path or file:// URL), an http(s)://
    prefix read directly where its options allow, or any fsspec URL (``options`` are its storage
    options)."""
    options = dict(options or {})
    if is_http(prefix) and direct_reader(prefix, options, timeout) is not None:
        return _Http(prefix, options, tries, backoff, timeout)
    if is_url(prefix):
        return _Remote(prefix, options, tries, backoff, timeout)
    if options:
        raise TypeError(f"options {sorted(options)} apply only to URLs")
    return _Local(local_path(prefix))

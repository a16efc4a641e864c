"""Where a content-addressed pack's chunks live: a local directory or an fsspec prefix.

An object is written whole or not at all: locally under a temporary name renamed into place,
remotely by one PUT (S3 and memory:// make an object visible only once complete). A chunk object
never changes once written (its name is its hash), so objects need no version pinning: the
reader checks every chunk against its name instead.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .._replacing import replacing
from ._base import PARALLEL_REQUESTS, StoreError
from ._retries import call_with_retries

__all__ = ["Objects", "open_objects"]


class Objects:
    """Named immutable objects under one prefix."""

    #: Where they are (a directory path or a URL ending in "/"), for messages.
    where: str
    #: How many :meth:`get` calls are useful at once (a remote prefix: many).
    parallel_reads: int = 1

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


class _Remote(Objects):
    """Objects under an fsspec URL prefix, fetched whole with the same deadlines, retries and
    error mapping as :class:`FsspecStore`."""

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

        return call_with_retries(self.where, what, fn, self._tries, self._backoff)

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


def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def open_objects(
    prefix: str,
    options: dict[str, Any] | None = None,
    *,
    tries: int = 3,
    backoff: float = 0.2,
    timeout: float = 10.0,
) -> Objects:
    """The objects under ``prefix``: a local directory (a path or file:// URL) or any fsspec URL
    (``options`` are its storage options)."""
    if is_url(prefix):
        return _Remote(prefix, dict(options or {}), tries, backoff, timeout)
    if options:
        raise TypeError(f"options {sorted(options)} apply only to URLs")
    return _Local(prefix.removeprefix("file://"))

"""A store over an http(s):// URL, read with ranged, conditional GETs by :mod:`._http`.

It is what :func:`open_store` gives for an HTTP URL whose options the direct reader honours
(headers, a TLS context or ``ssl=False``, ``client_kwargs`` headers and timeout); other options
(aiohttp objects, proxies, cookies) go to :class:`FsspecStore`. It imports neither fsspec nor
aiohttp, so a program reading over HTTP gets no at-fork hook of theirs.

The open is one GET of the first 64 KiB whose answer names the size and the version (ETag, else
Last-Modified); every later read carries ``If-Match`` (or ``If-Unmodified-Since``), and every
answer's total size and validators are checked against the open's before its body is read, so a
changed object is ESTALE, never other bytes, even from a server that ignores If-Match
(stores/_pinning.py). A server that ignores Range is refused at the open when the object is
longer than the first read (every later read would fail), and a 200 to a later read is EIO.
Failures go through the retry policy of every remote store (stores/_retries.py): bounded tries
with a doubling backoff, and at once for a 412, an answer of another version, a 200 to a ranged
read, refused credentials, an untrusted certificate or a 4xx.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

from ._base import PARALLEL_REQUESTS, Store, StoreError
from ._http import RangeReader, direct_reader
from ._pinning import (
    DEFAULT_TIMEOUT,
    HEAD_BYTES,
    Version,
    check_answer,
    http_conditions,
    stale,
    take_head,
    version_of,
)
from ._retries import call_with_retries

__all__ = ["HttpStore"]

_T = TypeVar("_T")


class HttpStore(Store):
    """The object at an ``http://`` or ``https://`` URL, read range by range (never whole).

    ``options``: ``headers`` (sent with every request), ``ssl`` (an ``ssl.SSLContext``, or
    False: no verification, as aiohttp takes it) and ``client_kwargs`` with ``headers`` and a
    ``timeout`` (an object with ``total``, as aiohttp's ClientTimeout); any other is a TypeError
    (:class:`FsspecStore` takes them). ``tries``, ``backoff`` and ``timeout`` as
    :class:`FsspecStore`'s. The size, the version and the first 64 KiB are read at
    construction, in one request, and the store is pinned to that version: a read after the
    object changed raises StoreError with errno ESTALE (a 412, or an answer whose total size or
    ETag is not the open's). A server that ignores Range requests is a StoreError (EIO) at
    construction when the object is longer than 64 KiB. Redirects are followed.
    """

    def __init__(
        self,
        url: str,
        *,
        tries: int = 3,
        backoff: float = 0.2,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        if tries < 1:
            raise ValueError(f"tries must be at least 1, not {tries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        reader = direct_reader(url, options, timeout)
        if reader is None:
            raise TypeError(f"{url}: options {sorted(options)} need FsspecStore (HttpStore takes"
                            " headers, ssl and client_kwargs' headers and timeout)")  # fmt: skip
        self.url = url
        self._tries, self._backoff, self._timeout = tries, backoff, timeout
        self._options = options
        self._init(reader, Version(0), b"")
        try:
            self._version, self._head = self._call("open", self._first)
        except BaseException:
            reader.close()
            raise
        self._conditions = http_conditions(self._version)

    def _init(self, reader: RangeReader, version: Version, head: bytes) -> None:
        self._reader = reader
        self._version = version
        self._head = head  # the object's first bytes, of this version
        self._conditions = http_conditions(version)  # the pin, on every read
        self._closed = False

    def _first(self) -> tuple[Version, bytes]:
        """The size, the version and the first bytes, in one GET (an empty object: a HEAD)."""
        answer = self._reader.first(HEAD_BYTES)
        if answer is None:
            return self._info(), b""
        size, validators, head = answer
        if len(head) != min(HEAD_BYTES, size):
            raise StoreError(errno.EIO, f"{self.url}: asked for bytes 0..{HEAD_BYTES}, got "
                             f"{len(head)} of {size} bytes")  # fmt: skip
        return version_of("http", validators, size), head

    def _info(self) -> Version:
        """The object's size and identity, asked of the server now (one HEAD)."""
        size, validators = self._reader.head()
        if size is None:
            raise StoreError(errno.EIO, f"{self.url}: the server does not say how large it is")
        return version_of("http", validators, size)

    @property
    def size(self) -> int:
        return self._version.size

    @property
    def parallel_reads(self) -> int:
        """16: each read is one request on a connection of its thread's, and many in flight
        hide the round trip."""
        return PARALLEL_REQUESTS

    def read_range(self, offset: int, view: memoryview) -> None:
        if self._closed:
            raise StoreError(errno.EBADF, f"{self.url}: the store is closed")
        offset, view = take_head(self._head, offset, view)  # came with the open: no request
        if not view:
            return
        reader, conditions, version = self._reader, self._conditions, self._version

        def check(total: int | None, validators: dict[str, str]) -> None:
            check_answer(version, total, validators)

        self._call(f"bytes {offset}..{offset + len(view)}",
                   lambda: reader.get_into(offset, view, conditions, check=check))  # fmt: skip

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` with bounded retries; failures become StoreError naming the URL and cause."""

        def changed(caught: Exception) -> StoreError:
            try:
                now: Version | None = self._info()
            except Exception:
                now = None  # the cause stays the 412
            return stale(self.url, what, self._version, now)

        return call_with_retries(self.url, what, fn, self._tries, self._backoff, changed)

    def reopen(self) -> HttpStore:
        """A copy for this process (after fork) over the same version, with what the open
        learned (size, version, first bytes) and connections of its own: no request. Every read
        names the version (If-Match), so a changed object fails it with ESTALE. Only where none
        can (the server named no version) does reopen ask again (one HEAD) and raise ESTALE at
        once if the size changed."""
        reader = direct_reader(self.url, self._options, self._timeout)
        assert reader is not None, "the options were honoured at the open"
        store = HttpStore.__new__(HttpStore)
        store.url, store._options = self.url, self._options
        store._tries, store._backoff, store._timeout = self._tries, self._backoff, self._timeout
        store._init(reader, self._version, self._head)
        if store._conditions:
            return store
        try:
            changes = self._version.changes(store._call("reopen", store._info))
            if changes:
                raise StoreError(errno.ESTALE, f"{self.url}: reopen: the object changed since"
                                 f" it was opened ({', '.join(changes)})")  # fmt: skip
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self._closed = True
        self._reader.close()

    def __repr__(self) -> str:
        return f"<HttpStore {self.url!r} {self.size} bytes>"

"""Ranged HTTP GETs read straight into the caller's buffer: the transport of HttpStore.

Design note
-----------
fsspec's HTTP filesystem runs every request of a process on one asyncio thread: aiohttp reads
each response into chunks, joins them into one bytes object, and the store copies that into
the handler's buffer. With sixteen 2 MiB reads in flight that one thread is the handler's
bottleneck (a Python handler on this 2-vCPU VM moved 256 MiB at about 0.6x a plain GET). Here
each fetch thread keeps an ``http.client`` connection of its own per server (keep-alive) and
reads the body with ``readinto`` into the buffer it was given: the socket's bytes are copied
once, by the kernel, with the GIL released while it waits. The requests are the ranged GETs
fsspec would send, with the same headers (the pinning preconditions included), and redirects
are followed as aiohttp follows them (up to 10; the Authorization header is not sent to another
origin), so servers see no difference. No fsspec, no aiohttp: a program reading over HTTP
installs no at-fork hook of theirs.

Only plain options take this path (headers, a TLS context or ``ssl=False``, a timeout); anything
else (aiohttp auth objects, connectors, proxies, cookies) is left to FsspecStore.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["HTTPStatusError", "RangeIgnoredError", "RangeReader", "direct_reader", "range_reader"]

#: What a read checks an answer's version with: it is called with the total size the answer
#: names (None: none) and its validators, before the body is read, and raises if they are not
#: the version the read asked for (stores/_pinning.py's check_answer).
Check = Callable[[int | None, dict[str, str]], None]

#: Request options fsspec would hand to aiohttp that this path can honour.
_REQUEST_OPTIONS = frozenset({"headers", "ssl"})
#: ``client_kwargs`` (aiohttp.ClientSession's) that this path can honour.
_SESSION_OPTIONS = frozenset({"headers", "timeout"})
#: Redirects followed for one request, as aiohttp's default ``max_redirects``.
_MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_Origin = tuple[str, str, int | None]


class HTTPStatusError(Exception):
    """The server answered a ranged GET with ``status`` (not 206)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


class RangeIgnoredError(Exception):
    """The server answered a ranged GET with 200 and the whole object: it ignores Range. Not
    transient (the same server answers the same way next time)."""


def _refused(response: http.client.HTTPResponse) -> NoReturn:
    """Raise what an answer other than the bytes asked for means (its body is read first, so the
    connection stays usable)."""
    response.read()
    if response.status == 404:
        raise FileNotFoundError(f"HTTP 404 {response.reason}")
    raise HTTPStatusError(response.status, response.reason)


def _origin(url: str) -> _Origin:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname or "", parts.port


def _target(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class RangeReader:
    """GETs of byte ranges of ``url`` (or of objects under it) into buffers, one keep-alive
    connection per thread and server."""

    def __init__(
        self, url: str, headers: dict[str, str], timeout: float, context: ssl.SSLContext | None
    ) -> None:
        self.url = url
        self._headers = headers
        self._timeout = timeout
        self._context = context  # None: the default one, made at the first HTTPS connection
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._closed = False

    def _mine(self) -> dict[_Origin, http.client.HTTPConnection]:
        mine: dict[_Origin, http.client.HTTPConnection] | None = getattr(self._local, "conns", None)
        if mine is None:
            mine = self._local.conns = {}
        return mine

    def _connection(self, origin: _Origin) -> http.client.HTTPConnection:
        mine = self._mine()
        conn = mine.get(origin)
        if conn is None:
            scheme, host, port = origin
            if scheme == "https":
                if self._context is None:  # loading the system's CAs takes tens of ms
                    self._context = ssl.create_default_context()
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self._timeout, context=self._context
                )
            elif scheme == "http":
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            else:
                raise ValueError(f"a redirect to {scheme}:, not HTTP")
            with self._lock:
                if self._closed:
                    raise ConnectionError("the store is closed")
                self._connections.append(conn)
            mine[origin] = conn
        return conn

    def _drop(self) -> None:
        """Close this thread's connections (a half-read response leaves one unusable)."""
        mine = self._mine()
        dropped = list(mine.values())
        mine.clear()
        for conn in dropped:
            conn.close()
        with self._lock:
            self._connections = [c for c in self._connections if c not in dropped]

    def _request(self, method: str, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The answer to ``method url``, redirects followed; one fresh try when the server had
        closed this thread's idle keep-alive connection."""
        reused = bool(self._mine())
        try:
            return self._follow(method, url, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            self._drop()  # the server closed the idle connection: one fresh try, no backoff
            return self._follow(method, url, headers)

    def _follow(self, method: str, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        for _ in range(_MAX_REDIRECTS + 1):
            conn = self._connection(_origin(url))
            conn.request(method, _target(url), headers=headers)
            response = conn.getresponse()
            location = response.getheader("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            response.read()
            moved = urllib.parse.urljoin(url, location)
            if _origin(moved) != _origin(url):  # as aiohttp: no credentials to another origin
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = moved
        raise ValueError(f"more than {_MAX_REDIRECTS} redirects")

    def get_into(
        self,
        start: int,
        view: memoryview,
        conditions: dict[str, str],
        name: str = "",
        check: Check | None = None,
    ) -> None:
        """Bytes [start, start + len(view)) of the object (``name``: of the object ``name``
        under the reader's URL, a prefix) into ``view``, in one request; ``conditions``
        (If-Match, ...) make the server refuse another version with 412, and ``check`` is
        given the answer's total size and validators before a byte of its body is read (a
        server may ignore the conditions). A 200 (Range ignored) is RangeIgnoredError, once
        ``check`` has seen its size and validators."""
        end = start + len(view)
        deadline = time.monotonic() + self._timeout
        headers = {**self._headers, **conditions, "Range": f"bytes={start}-{end - 1}"}
        try:
            response = self._request("GET", self.url + name, headers)
            if response.status == 200:  # its body is the whole object: dropped with the link
                if check is not None:
                    check(_number(response.getheader("Content-Length")), _validators(response))
                raise RangeIgnoredError(
                    f"asked for bytes {start}..{end}, the server sent the whole object (200)"
                )
            if response.status != 206:
                _refused(response)
            expected = f"bytes {start}-{end - 1}/"
            content_range = response.getheader("Content-Range") or ""
            encoding = response.getheader("Content-Encoding") or "identity"
            if not content_range.startswith(expected) or encoding != "identity":
                response.read()
                raise ValueError(f"asked for {expected}..., the server sent {content_range!r}"
                                 f" ({encoding})")  # fmt: skip
            if check is not None:
                check(_number(content_range.rpartition("/")[2]), _validators(response))
            self._read_body(response, view, deadline)
            if response.read(1):
                raise ValueError(f"the server sent more than the {len(view)} bytes asked for")
        except BaseException:
            self._drop()
            raise

    def _read_body(
        self, response: http.client.HTTPResponse, view: memoryview, deadline: float
    ) -> None:
        """Exactly ``len(view)`` bytes of ``response``'s body into ``view``, by ``deadline``."""
        got = 0
        while got < len(view):
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(0), len(view) - got)
            got += n
            if time.monotonic() > deadline:
                raise TimeoutError(f"{got} of {len(view)} bytes in {self._timeout:g} s")

    def first(self, length: int) -> tuple[int, dict[str, str], bytes] | None:
        """One GET of bytes [0, length): the object's size, the response's headers (its
        validators) and those bytes; None when the answer does not say the size (an empty
        object's 416, an encoded body). A 200 (Range ignored) is the whole object: taken when
        it is no longer than ``length`` (every later read is of those bytes), else
        RangeIgnoredError (every later read would fail)."""
        try:
            return self._first(length)
        except BaseException:
            self._drop()
            raise

    def _first(self, length: int) -> tuple[int, dict[str, str], bytes] | None:
        headers = {**self._headers, "Range": f"bytes=0-{length - 1}"}
        response = self._request("GET", self.url, headers)
        validators = _validators(response)
        if response.status == 206:
            total = (response.getheader("Content-Range") or "").rpartition("/")[2]
        elif response.status == 200:
            total = response.getheader("Content-Length") or ""
        elif response.status == 416:  # an empty object has no byte 0
            response.read()
            return None
        else:
            _refused(response)
        if response.status == 200 and not (total.isdigit() and int(total) <= length):
            self._drop()  # the rest of the object is on the way: dropped with the connection
            size = f"all {total} bytes" if total.isdigit() else "the whole object"
            raise RangeIgnoredError(f"asked for bytes 0..{length}, the server sent {size} (200)")
        if not total.isdigit() or response.getheader("Content-Encoding", "identity") not in (
            "identity",
            "",
        ):
            self._drop()  # the body is not read: the connection is not reusable
            return None
        want = min(length, int(total))
        data = bytearray(want)
        view = memoryview(data)
        self._read_body(response, view, time.monotonic() + self._timeout)
        if response.read(1):
            raise ValueError(f"the server sent more than the {want} bytes asked for")
        return int(total), validators, bytes(data)

    def head(self) -> tuple[int | None, dict[str, str]]:
        """One HEAD: the object's size (None when the server does not say it) and validators."""
        try:
            response = self._request("HEAD", self.url, dict(self._headers))
            if response.status != 200:
                _refused(response)
            response.read()
        except BaseException:
            self._drop()
            raise
        length = response.getheader("Content-Length") or ""
        return (int(length) if length.isdigit() else None), _validators(response)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


def _number(text: str | None) -> int | None:
    """A header's decimal number (a size), or None where it names none (``*``, absent)."""
    return int(text) if text is not None and text.isdigit() else None


def _validators(response: http.client.HTTPResponse) -> dict[str, str]:
    """ETag and Last-Modified (case-insensitive lookups, under the names version_of asks for)."""
    return {
        name: value
        for name in ("ETag", "Last-Modified")
        if (value := response.getheader(name)) is not None
    }


def range_reader(url: str, request_options: dict[str, Any], client_options: dict[str, Any],
                 timeout: float) -> RangeReader | None:  # fmt: skip
    """A reader for ``url`` with fsspec's HTTP options (its request options and
    ``client_kwargs``), or None where this path cannot honour them."""
    if not set(request_options) <= _REQUEST_OPTIONS or not set(client_options) <= _SESSION_OPTIONS:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.username or parts.password:
        return None
    headers = {**(client_options.get("headers") or {}), **(request_options.get("headers") or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return None
    total = getattr(client_options.get("timeout"), "total", None)
    context = request_options.get("ssl")
    if context is True:  # aiohttp's ssl=True: the default verification
        context = None
    elif context is False:  # aiohttp's ssl=False: no verification
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif context is not None and not isinstance(context, ssl.SSLContext):
        return None
    return RangeReader(url, headers, total if isinstance(total, (int, float)) else timeout, context)


def direct_reader(url: str, options: dict[str, Any], timeout: float) -> RangeReader | None:
    """A reader of ``url`` with these storage options (fsspec's names: request options and
    ``client_kwargs``), or None where this path cannot honour them."""
    request = {k: v for k, v in options.items() if k != "client_kwargs"}
    client = dict(options.get("client_kwargs") or {})
    return range_reader(url, request, client, timeout)

"""Ranged HTTP GETs read straight into the caller's buffer: the fast path of FsspecStore.

Design note
-----------
fsspec's HTTP filesystem runs every request of a process on one asyncio thread: aiohttp reads
each response into chunks, joins them into one bytes object, and the store copies that into
the handler's buffer. With sixteen 2 MiB reads in flight that one thread is the handler's
bottleneck (a Python handler on this 2-vCPU VM moved 256 MiB at about 0.6x a plain GET). Here
each fetch thread keeps an ``http.client`` connection of its own (keep-alive) and reads the body
with ``readinto`` into the buffer it was given: the socket's bytes are copied once, by the
kernel, with the GIL released while it waits. The requests are the same ranged GETs with the
same headers (the pinning preconditions included), so servers see no difference.

Only plain options take this path (headers, a TLS context or ``ssl=False``, a timeout); anything
else (aiohttp auth objects, connectors, proxies, cookies) and any redirect is left to fsspec.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from typing import Any, NoReturn

__all__ = ["HTTPStatusError", "RangeReader", "RedirectedError", "range_reader"]

#: Request options fsspec would hand to aiohttp that this path can honour.
_REQUEST_OPTIONS = frozenset({"headers", "ssl"})
#: ``client_kwargs`` (aiohttp.ClientSession's) that this path can honour.
_SESSION_OPTIONS = frozenset({"headers", "timeout"})


class HTTPStatusError(Exception):
    """The server answered a ranged GET with ``status`` (not 206)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


class RedirectedError(Exception):
    """The server redirected the request: fsspec (aiohttp) follows redirects, this path not."""


def _refused(response: http.client.HTTPResponse) -> NoReturn:
    """Raise what an answer other than the bytes asked for means (its body is read first, so the
    connection stays usable)."""
    response.read()
    if 300 <= response.status < 400:
        raise RedirectedError(response.getheader("Location") or "")
    if response.status == 404:
        raise FileNotFoundError(f"HTTP 404 {response.reason}")
    raise HTTPStatusError(response.status, response.reason)


class RangeReader:
    """GETs of byte ranges of ``url`` into buffers, one keep-alive connection per thread."""

    def __init__(
        self, url: str, headers: dict[str, str], timeout: float, context: ssl.SSLContext | None
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = headers
        self._timeout = timeout
        self._context = context  # None: the default one, made at the first HTTPS connection
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._closed = False

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                if self._context is None:  # loading the system's CAs takes tens of ms
                    self._context = ssl.create_default_context()
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            with self._lock:
                if self._closed:
                    raise ConnectionError("the store is closed")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def get_into(self, start: int, view: memoryview, conditions: dict[str, str]) -> None:
        """Bytes [start, start + len(view)) into ``view``, in one request; ``conditions``
        (If-Match, ...) make the server refuse another version with 412."""
        reused = getattr(self._local, "conn", None) is not None
        try:
            try:
                self._get_into(start, view, conditions)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused:
                    raise
                # The server closed the idle keep-alive connection: one fresh try, no backoff.
                self._drop()
                self._get_into(start, view, conditions)
        except BaseException:
            self._drop()  # a half-read response leaves the connection unusable
            raise

    def _get_into(self, start: int, view: memoryview, conditions: dict[str, str]) -> None:
        end = start + len(view)
        deadline = time.monotonic() + self._timeout
        conn = self._connection()
        headers = {**self._headers, **conditions, "Range": f"bytes={start}-{end - 1}"}
        conn.request("GET", self._target, headers=headers)
        response = conn.getresponse()
        if response.status != 206:
            _refused(response)
        expected = f"bytes {start}-{end - 1}/"
        content_range = response.getheader("Content-Range") or ""
        encoding = response.getheader("Content-Encoding") or "identity"
        if not content_range.startswith(expected) or encoding != "identity":
            response.read()
            raise ValueError(f"asked for {expected}..., the server sent {content_range!r}"
                             f" ({encoding})")  # fmt: skip
        self._read_body(response, view, deadline)
        if response.read(1):
            raise ValueError(f"the server sent more than the {len(view)} bytes asked for")

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
        object's 416, an encoded body). A 200 (Range ignored) gives the first bytes too."""
        try:
            return self._first(length)
        except BaseException:
            self._drop()
            raise

    def _first(self, length: int) -> tuple[int, dict[str, str], bytes] | None:
        conn = self._connection()
        headers = {**self._headers, "Range": f"bytes=0-{length - 1}"}
        conn.request("GET", self._target, headers=headers)
        response = conn.getresponse()
        validators = {  # case-insensitive lookups, under the names _version_of asks for
            name: value
            for name in ("ETag", "Last-Modified")
            if (value := response.getheader(name)) is not None
        }
        if response.status == 206:
            total = (response.getheader("Content-Range") or "").rpartition("/")[2]
        elif response.status == 200:
            total = response.getheader("Content-Length") or ""
        elif response.status == 416:  # an empty object has no byte 0
            response.read()
            return None
        else:
            _refused(response)
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
        if response.status == 200 and int(total) > want:
            self._drop()  # the rest of the object is on the way: drop it with the connection
        elif response.read(1):
            raise ValueError(f"the server sent more than the {want} bytes asked for")
        return int(total), validators, bytes(data)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


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

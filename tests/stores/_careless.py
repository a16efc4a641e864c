"""A small HTTP server on loopback that is careless the ways real ones are (tests only).

It serves the files under a directory as they are at each request (a file replaced with
``os.replace`` is served new at once), with an ETag of the file's size and mtime and a
Last-Modified, and it can:

- ignore ``If-Match`` and ``If-Unmodified-Since`` (``conditions=False``): a replaced object is
  served as 206 with the new ETag and the new total size, never 412;
- ignore ``Range`` (``ranges=False``): every GET is 200 with the whole object;
- send no ETag (``etag=False``), leaving Last-Modified as the only validator, or neither
  (``last_modified=False`` too).

Every request is logged as (method, path, status, Range header or "-") in :attr:`requests`, and
its headers in :attr:`headers`.
It runs in a thread of the test's process; a forked child (a lazy mapping's handler) reaches it
over the socket like any other client.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Careless", "careless"]


class Careless:
    """The server's switches and its log; :attr:`url` is ``http://127.0.0.1:PORT``."""

    def __init__(self, root: Path, *, conditions: bool = True, ranges: bool = True,
                 etag: bool = True, last_modified: bool = True) -> None:  # fmt: skip
        self.root = root
        self.conditions = conditions
        self.ranges = ranges
        self.etag = etag
        self.last_modified = last_modified
        self.requests: list[tuple[str, str, int, str]] = []
        #: The headers of each request, in the same order.
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        server = _Quiet(("127.0.0.1", 0), _handler_for(self))
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def log(self, method: str, path: str, status: int, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path, status, headers.get("Range", "-")))
            self.headers.append(headers)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class _Quiet(http.server.ThreadingHTTPServer):
    """Threads that die with the test; a client that drops a connection (as the store does
    with an answer it refuses) is not an error worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


def _handler_for(owner: Careless) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the store's reader expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
            owner.log(self.command, self.path, status, dict(self.headers.items()))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _answer(self, body: bool) -> None:
            path = owner.root / self.path.lstrip("/")
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
            except OSError:
                self._send(404, {}, b"", body)
                return
            etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
            modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            headers = {"Accept-Ranges": "bytes" if owner.ranges else "none"}
            if owner.etag:
                headers["ETag"] = etag
            if owner.last_modified:
                headers["Last-Modified"] = modified
            if owner.conditions:
                wanted = self.headers.get("If-Match")
                since = self.headers.get("If-Unmodified-Since")
                if (wanted is not None and wanted != etag) or (
                    since is not None and _later(st.st_mtime, since)
                ):
                    self._send(412, {}, b"", body)
                    return
            match = _RANGE.match(self.headers.get("Range") or "")
            if not owner.ranges or match is None or self.command != "GET":
                self._send(200, headers, data, body)
                return
            start, end = int(match[1]), min(int(match[2]), len(data) - 1)
            if start >= len(data):
                self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, headers, data[start : end + 1], body)

    return Handler


def _later(mtime: float, since: str) -> bool:
    """Whether a file of ``mtime`` was modified after the HTTP date ``since``."""
    try:
        return int(mtime) > email.utils.parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError):
        return True


@contextlib.contextmanager
def careless(root: Path, **switches: bool) -> Iterator[Careless]:
    server = Careless(root, **switches)
    try:
        yield server
    finally:
        server.close()

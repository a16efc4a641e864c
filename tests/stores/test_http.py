"""The direct HTTP reader (stores/_http.py, under HttpStore): which options it takes (the rest
is FsspecStore's), and how it follows redirects."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import aiohttp
import pytest

from tests.stores.conftest import Served
from userfaultfd.stores import Store
from userfaultfd.stores._http import RangeReader, range_reader

URL = "http://127.0.0.1:1/data.bin"


def test_plain_options_take_the_direct_path_with_every_header() -> None:
    session = {"headers": {"Authorization": "Basic dTpw"}, "timeout": aiohttp.ClientTimeout(7)}
    reader = range_reader(URL, {"headers": {"X-Trace": "t"}}, session, 10.0)
    assert isinstance(reader, RangeReader)
    assert reader._headers == {"Authorization": "Basic dTpw", "X-Trace": "t"}
    assert reader._timeout == 7


@pytest.mark.parametrize(
    ("url", "request_options", "session_options"),
    [
        (URL, {}, {"cookies": {"session": "s"}}),  # a session option it does not send
        (URL, {"proxy": "http://127.0.0.1:3128"}, {}),
        ("http://u:p@127.0.0.1:1/data.bin", {}, {}),  # credentials in the URL
        (URL, {"ssl": "yes"}, {}),
    ],
    ids=["cookies", "proxy", "userinfo", "odd-ssl"],
)
def test_other_options_are_left_to_fsspec(
    url: str, request_options: dict[str, Any], session_options: dict[str, Any]
) -> None:
    assert range_reader(url, request_options, session_options, 10.0) is None


def test_ssl_false_means_no_verification_as_in_aiohttp() -> None:
    reader = range_reader("https://127.0.0.1:1/x", {"ssl": False}, {}, 10.0)
    assert isinstance(reader, RangeReader)
    context = reader._context
    assert context is not None, "ssl=False made no context"
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)


def test_a_redirect_is_followed_on_every_request(
    http_store: Callable[..., Store], served: Served
) -> None:
    before = len(served.server.requests("moved.bin"))
    store = http_store(served.url("moved.bin"))
    for offset in (100_000, 400_000):
        buffer = bytearray(50_000)
        assert store.read_into(offset, memoryview(buffer)) == len(buffer)
        assert buffer == served.payload[offset : offset + len(buffer)], f"bytes at {offset}"
    rows = served.server.requests("moved.bin")[before:]
    # The open and the two reads, each redirected (as aiohttp does: no redirect is remembered)
    # and each sent again, with its Range, where the redirect points.
    assert [(status, sent_range) for _m, status, sent_range, _n in rows] == [
        (302, "bytes=0-65535"),
        (302, "bytes=100000-149999"),
        (302, "bytes=400000-449999"),
    ], rows
    followed = {row[2] for row in served.server.requests("data.bin") if row[1] == 206}
    assert {"bytes=100000-149999", "bytes=400000-449999"} <= followed, followed
    store.close()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a redirect to ``moved_to`` (when set) or 16 bytes, keeping the
    headers it was sent."""

    moved_to = ""
    seen: ClassVar[list[dict[str, str]]]

    def do_GET(self) -> None:
        type(self).seen.append(dict(self.headers.items()))
        if self.moved_to:
            self.send_response(307)
            self.send_header("Location", self.moved_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = bytes(range(1, 17))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-15/{len(body)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(30)
def test_a_redirect_to_another_origin_drops_the_credentials() -> None:
    """As aiohttp: Authorization goes to the origin it was given for, not where it redirects;
    the other headers follow."""

    class There(_Recorder):
        seen: ClassVar[list[dict[str, str]]] = []

    there = http.server.HTTPServer(("127.0.0.1", 0), There)

    class Here(_Recorder):
        seen: ClassVar[list[dict[str, str]]] = []
        moved_to = f"http://127.0.0.1:{there.server_address[1]}/data.bin"

    here = http.server.HTTPServer(("127.0.0.1", 0), Here)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (here, there)]
    for thread in threads:
        thread.start()
    try:
        reader = range_reader(f"http://127.0.0.1:{here.server_address[1]}/x", {"headers": {
            "Authorization": "Basic dTpw", "X-Trace": "t"}}, {}, 10.0)  # fmt: skip
        assert reader is not None
        answer = reader.first(16)
        reader.close()
    finally:
        for server in (here, there):
            server.shutdown()
            server.server_close()
    assert answer is not None and answer[2] == bytes(range(1, 17)), answer
    (sent_here,), (sent_there,) = Here.seen, There.seen
    assert sent_here.get("Authorization") == "Basic dTpw", sent_here
    assert "Authorization" not in sent_there, f"credentials sent to another origin: {sent_there}"
    assert sent_there.get("X-Trace") == "t" and sent_there.get("Range") == "bytes=0-15", sent_there

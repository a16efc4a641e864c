"""The direct HTTP path of FsspecStore (stores/_http.py): which options it takes, and what it
leaves to fsspec's client."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import pytest

from tests.stores.conftest import Served
from userfaultfd.stores import FsspecStore
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


def test_a_redirect_is_followed_by_fsspec_from_then_on(served: Served) -> None:
    before = len(served.server.requests("moved.bin"))
    store = FsspecStore(served.url("moved.bin"))
    for offset in (100_000, 400_000):
        buffer = bytearray(50_000)
        assert store.read_into(offset, memoryview(buffer)) == len(buffer)
        assert buffer == served.payload[offset : offset + len(buffer)], f"bytes at {offset}"
    rows = served.server.requests("moved.bin")[before:]
    # The open (aiohttp follows), the direct path's first try, then fsspec's two reads.
    assert [status for _m, status, *_ in rows] == [302, 302, 302, 302], rows
    store.close()

"""Every answer of a remote store is checked against the version its open saw (issue 21).

A server that ignores If-Match (a small server, a cache, a gateway) answers a read of a replaced
object with 206 and the new bytes, but its answer names their version: a new ETag, a new total
size in Content-Range, a new Last-Modified. The store compares those with what the open recorded
before a byte reaches the caller: ESTALE at once, never retried, never the new bytes. A server
that ignores Range (200 to a ranged GET) is refused at the open when the object is longer than
the open's read, and a 200 to a later read is EIO at once, not retried as if transient.

The servers are tests/stores/_careless.py's, on loopback, serving files that the tests replace
with ``os.replace``; S3 is moto, with the precondition left off the request (as a look-alike that
ignores it would).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest

from tests._target import Channel, Target
from tests.stores._careless import Careless, careless
from tests.stores.conftest import S3
from userfaultfd.runtime import Single, lazy
from userfaultfd.stores import FsspecStore, HttpStore, Store, StoreError
from userfaultfd.stores import _fsspec as fsspec_store
from userfaultfd.stores._pinning import HEAD_BYTES

PAGE = mmap.PAGESIZE
#: The first page the open did not bring along: reading it sends a request.
FAR = -(-HEAD_BYTES // PAGE) * PAGE
#: 5 s between tries: a retry would show in the time a failed read takes.
BACKOFF = 5.0


def position_bytes(size: int, salt: int = 0) -> bytes:
    """Bytes that depend on their position (and ``salt``) and are never zero."""
    return bytes(1 + (i * 7 + i // 251 + salt) % 255 for i in range(size))


OLD = position_bytes(FAR + 8 * PAGE + 123)
#: What a deploy puts in its place: a longer array, other bytes.
LONGER = position_bytes(len(OLD) + 5 * PAGE, salt=100)
#: The same size, other bytes: only a validator can tell.
SAME_SIZE = position_bytes(len(OLD), salt=50)
assert 0 not in OLD and 0 not in LONGER and 0 not in SAME_SIZE


def first_wrong(got: bytes, want: bytes, at: int = 0) -> str:
    """ "" when ``got`` is ``want``; else the first byte that differs and how many do."""
    if got == want:
        return ""
    if len(got) != len(want):
        return f"{len(got)} bytes where {len(want)} were expected"
    wrong = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    i = wrong[0]
    return f"byte {at + i} is {got[i]}, not {want[i]} ({len(wrong)} of {len(want)} bytes wrong)"


def replace_with(path: Path, data: bytes, *, age: float = 10.0) -> None:
    """What a deploy does: a new file beside ``path``, renamed over it; its mtime ``age``
    seconds past the old one's (so a Last-Modified in seconds changes too)."""
    mtime = path.stat().st_mtime
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, (mtime + age, mtime + age))
    os.replace(tmp, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    (folder / "data.bin").write_bytes(OLD)
    return folder


@pytest.fixture(params=[HttpStore, FsspecStore], ids=["HttpStore", "FsspecStore"])
def store_type(request: pytest.FixtureRequest) -> Callable[..., Store]:
    made: Callable[..., Store] = request.param
    return made


def gets(server: Careless) -> list[tuple[int, str]]:
    """(status, Range) of every GET of /data.bin, in order."""
    return [(status, rng) for m, path, status, rng in server.requests
            if m == "GET" and path == "/data.bin"]  # fmt: skip


def refused_read(store: Store, offset: int) -> tuple[StoreError, float]:
    """The StoreError a read of the page at ``offset`` raises, and the seconds it took; the
    buffer must be left as it was (no byte of another version reaches it)."""
    buffer = bytearray(b"\xa5" * PAGE)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.read_into(offset, memoryview(buffer))
    took = time.monotonic() - started
    assert buffer == b"\xa5" * PAGE, "a refused read wrote bytes of another version"
    return caught.value, took


# --- a server that ignores If-Match -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ignored_if_match_and_a_longer_file_is_estale(
    store_type: Callable[..., Store], root: Path
) -> None:
    with careless(root, conditions=False) as server:
        url = f"{server.url}/data.bin"
        store = store_type(url, backoff=BACKOFF)
        buffer = bytearray(PAGE)
        assert store.read_into(FAR, memoryview(buffer)) == PAGE
        assert not first_wrong(bytes(buffer), OLD[FAR : FAR + PAGE], FAR), "the opened version"
        replace_with(root / "data.bin", LONGER)
        err, took = refused_read(store, FAR + PAGE)
        assert err.errno == errno.ESTALE, f"errno {err.errno}, not ESTALE: {err}"
        assert took < BACKOFF / 2, f"the refused read took {took:.1f} s: it was retried"
        assert f"size {len(OLD)} -> {len(LONGER)}" in str(err), str(err)
        assert "ETag" in str(err) and url in str(err), str(err)
        # The careless server answered 206 with the new version; it was refused, not retried.
        assert gets(server)[-2:] == [
            (206, f"bytes={FAR}-{FAR + PAGE - 1}"),
            (206, f"bytes={FAR + PAGE}-{FAR + 2 * PAGE - 1}"),
        ], gets(server)
        # A restarted handler's copy is refused the same way, every page past the head.
        again = store.reopen()
        for offset in range(FAR, len(OLD), PAGE):
            err, _ = refused_read(again, offset)
            assert err.errno == errno.ESTALE, f"page at {offset}: {err}"
        head = bytearray(FAR)
        assert again.read_into(0, memoryview(head)) == FAR
        assert not first_wrong(bytes(head), OLD[:FAR]), "the kept head is not the opened version"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("switches", "replacement", "change"),
    [
        ({"etag": False}, SAME_SIZE, "Last-Modified"),  # same size: only Last-Modified tells
        ({"etag": False, "last_modified": False}, LONGER, f"size {len(OLD)} -> {len(LONGER)}"),
        ({}, SAME_SIZE, "ETag"),  # same size, ETag of size and mtime
    ],
    ids=["last-modified-only", "no-validators", "same-size"],
)
def test_ignored_preconditions_are_caught_by_what_the_answer_names(
    store_type: Callable[..., Store], root: Path, switches: dict[str, bool],
    replacement: bytes, change: str,
) -> None:  # fmt: skip
    with careless(root, conditions=False, **switches) as server:
        store = store_type(f"{server.url}/data.bin", backoff=BACKOFF)
        replace_with(root / "data.bin", replacement)
        err, took = refused_read(store, FAR)
        assert err.errno == errno.ESTALE, f"errno {err.errno}, not ESTALE: {err}"
        assert change in str(err), str(err)
        assert took < BACKOFF / 2, f"the refused read took {took:.1f} s: it was retried"
        assert [status for status, _ in gets(server)] == [206, 206], gets(server)


@pytest.mark.timeout(60)
def test_a_server_that_honours_if_match_still_gives_412(
    store_type: Callable[..., Store], root: Path
) -> None:
    """The answer check is a second line: a server that honours the precondition refuses
    (412), and the store says what changed as before."""
    with careless(root) as server:
        store = store_type(f"{server.url}/data.bin", backoff=BACKOFF)
        replace_with(root / "data.bin", LONGER)
        err, took = refused_read(store, FAR)
        assert err.errno == errno.ESTALE and took < BACKOFF / 2, (err, took)
        assert gets(server)[-1][0] == 412, gets(server)


@pytest.mark.timeout(60)
def test_an_unchanged_file_reads_whole_from_the_careless_server(
    store_type: Callable[..., Store], root: Path
) -> None:
    """No false alarm: the checks pass when nothing changed (every byte compared)."""
    with careless(root, conditions=False) as server:
        store = store_type(f"{server.url}/data.bin")
        buffer = bytearray(len(OLD))
        for offset in range(0, len(OLD), 3 * PAGE):
            view = memoryview(buffer)[offset : offset + 3 * PAGE]
            assert store.read_into(offset, view) == len(view)
        assert not first_wrong(bytes(buffer), OLD), "an unchanged file read wrong"


@pytest.mark.timeout(60)
def test_lazy_memory_over_a_careless_server_poisons_the_replaced_pages(root: Path) -> None:
    """lazy(url) in a child; the file is replaced by a longer one after the open; the program
    reads every page in order: the pages the open brought are the opened version's, byte for
    byte, and the first page past them is SIGBUS (poisoned), never the new file's bytes."""
    with careless(root, conditions=False) as server:
        url = f"{server.url}/data.bin"

        def body(channel: Channel) -> None:
            view = lazy(url, policy=Single())
            replace_with(root / "data.bin", LONGER)
            for offset in range(0, len(OLD), PAGE):
                channel.send(bytes(view[offset : offset + PAGE]))  # SIGBUS past the head

        with Target(body, timeout=30) as target:
            got = b"".join(target.recv()[0] for _ in range(FAR // PAGE))
            status = target.wait()
        assert not first_wrong(got, OLD[:FAR]), "the opened head: " + first_wrong(got, OLD[:FAR])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
            f"the first page past the head ended the program with status {status}, not SIGBUS"
        )
        # The handler read the page past the head once; the 206 of the new version was refused.
        assert gets(server)[1:] == [(206, f"bytes={FAR}-{FAR + PAGE - 1}")], gets(server)


# --- a server that ignores Range ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_server_ignoring_range_is_refused_at_open(
    store_type: Callable[..., Store], root: Path
) -> None:
    with careless(root, ranges=False) as server:
        url = f"{server.url}/data.bin"
        started = time.monotonic()
        with pytest.raises(StoreError, match="ignores Range requests") as caught:
            store_type(url, backoff=BACKOFF)
        assert caught.value.errno == errno.EIO, str(caught.value)
        assert time.monotonic() - started < BACKOFF / 2, "the open was retried"
        assert f"all {len(OLD)} bytes" in str(caught.value) and url in str(caught.value)
        assert gets(server) == [(200, f"bytes=0-{HEAD_BYTES - 1}")], gets(server)


@pytest.mark.timeout(60)
def test_a_small_object_from_a_server_ignoring_range_reads(
    store_type: Callable[..., Store], root: Path
) -> None:
    """An object no longer than the open's read came whole with it: nothing more is asked."""
    small = OLD[: HEAD_BYTES - 77]
    (root / "small.bin").write_bytes(small)
    with careless(root, ranges=False) as server:
        store = store_type(f"{server.url}/small.bin")
        buffer = bytearray(len(small))
        assert store.read_into(0, memoryview(buffer)) == len(small)
        assert not first_wrong(bytes(buffer), small), "the small object read wrong"
        assert len(server.requests) == 1, server.requests


@pytest.mark.timeout(60)
def test_a_200_after_the_open_is_eio_at_once(store_type: Callable[..., Store], root: Path) -> None:
    """The server starts ignoring Range after the open (another server behind the same name):
    the read fails at once (EIO, one request), never retried as if transient."""
    with careless(root) as server:
        store = store_type(f"{server.url}/data.bin", backoff=BACKOFF)
        server.ranges = False
        err, took = refused_read(store, FAR)
        assert err.errno == errno.EIO, f"errno {err.errno}: {err}"
        assert "ignores Range requests" in str(err), str(err)
        assert took < BACKOFF / 2, f"the read took {took:.1f} s: it was retried"
        assert gets(server)[1:] == [(200, f"bytes={FAR}-{FAR + PAGE - 1}")], gets(server)


@pytest.mark.timeout(60)
def test_a_200_of_another_version_is_estale(store_type: Callable[..., Store], root: Path) -> None:
    with careless(root) as server:
        store = store_type(f"{server.url}/data.bin", backoff=BACKOFF)
        server.ranges = False
        server.conditions = False
        replace_with(root / "data.bin", LONGER)
        err, took = refused_read(store, FAR)
        assert err.errno == errno.ESTALE, f"errno {err.errno}: {err}"
        assert f"size {len(OLD)} -> {len(LONGER)}" in str(err), str(err)
        assert took < BACKOFF / 2, f"the read took {took:.1f} s: it was retried"


# --- S3: an answer of another version, from a store that ignores IfMatch --------------------------


@pytest.fixture
def no_s3_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests leave without VersionId and IfMatch, as to a look-alike that ignores them."""
    monkeypatch.setattr(fsspec_store, "_s3_pin", lambda version: {})


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_s3_pin")
def test_s3_answer_of_another_version_is_estale(s3: S3) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.options)
    fs.pipe_file("test/versions.bin", OLD)
    store = FsspecStore("s3://test/versions.bin", backoff=BACKOFF, **s3.options)
    buffer = bytearray(PAGE)
    store.read_into(FAR, memoryview(buffer))
    assert not first_wrong(bytes(buffer), OLD[FAR : FAR + PAGE], FAR), "the opened version"
    fs.pipe_file("test/versions.bin", LONGER)
    err, took = refused_read(store, FAR + PAGE)
    assert err.errno == errno.ESTALE, f"errno {err.errno}: {err}"
    assert f"size {len(OLD)} -> {len(LONGER)}" in str(err) and "ETag" in str(err), str(err)
    assert took < BACKOFF / 2, f"the read took {took:.1f} s: it was retried"


@pytest.mark.timeout(60)
def test_fsspec_http_reads_send_the_callers_headers_and_the_pin(root: Path) -> None:
    """FsspecStore's own GET (not fsspec's cat_file) sends the session's headers with the
    precondition and the Range."""
    with careless(root) as server:
        headers = {"X-Trace": "versions"}
        store = FsspecStore(f"{server.url}/data.bin", client_kwargs={"headers": headers})
        buffer = bytearray(PAGE)
        assert store.read_into(FAR, memoryview(buffer)) == PAGE
        assert not first_wrong(bytes(buffer), OLD[FAR : FAR + PAGE], FAR)
        sent = server.headers[-1]
        assert sent.get("X-Trace") == "versions", sent
        st = (root / "data.bin").stat()
        assert sent.get("If-Match") == f'"{st.st_size:x}-{st.st_mtime_ns:x}"', sent
        assert sent.get("Range") == f"bytes={FAR}-{FAR + PAGE - 1}", sent

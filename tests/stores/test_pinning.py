"""A store is pinned to the bytes it opened: replaced, unlinked, shrunk or overwritten sources
give the original bytes or a StoreError, never the new bytes, a mix, or zeros."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from tests._target import Channel, Target
from tests.stores import _servers
from tests.stores.conftest import S3
from userfaultfd.runtime import Single, lazy
from userfaultfd.stores import (
    FileStore,
    FsspecStore,
    Store,
    StoreError,
    ZstdStore,
    open_store,
    pack,
)
from userfaultfd.stores._pinning import HEAD_BYTES as _HEAD_BYTES
from userfaultfd.stores._pinning import Version as _Version
from userfaultfd.stores._pinning import http_conditions as _http_conditions

PAGE = mmap.PAGESIZE
#: The first page a remote store's open did not bring along: reading it sends a request.
FAR = -(-_HEAD_BYTES // PAGE) * PAGE


def position_bytes(size: int, salt: int = 0) -> bytes:
    """Bytes that depend on their position (and ``salt``) and are never zero."""
    return bytes(1 + (i * 7 + i // 251 + salt) % 255 for i in range(size))


OLD = position_bytes(FAR + 4 * PAGE + 123)  # past the head that a remote store's open reads
NEW = position_bytes(len(OLD), salt=100)  # same size: only the bytes tell them apart
assert OLD != NEW and 0 not in OLD and 0 not in NEW


def noisy_bytes(size: int, seed: int) -> bytes:
    """Bytes that do not compress, none of them zero."""
    return bytes(1 + b % 255 for b in random.Random(seed).randbytes(size))


def read(store: Store, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    got = store.read_into(offset, memoryview(buffer))
    assert got == min(length, max(0, store.size - offset)), f"short read: {got} at {offset}"
    return bytes(buffer[:got])


def replace_with(path: Path, data: bytes) -> None:
    """What a deploy does: write a new file beside ``path``, rename it over ``path``."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "data.bin"
    file.write_bytes(OLD)
    return file


def test_replaced_file_reopened_reads_the_original(path: Path) -> None:
    with FileStore(path) as store:
        assert read(store, 0, PAGE) == OLD[:PAGE]
        replace_with(path, NEW)
        with store.reopen() as again:
            assert again.size == len(OLD)
            got = read(again, 0, len(OLD))
            assert got != NEW[: len(got)], "reopen() read the new file at the path"
            assert got == OLD, "reopen() read neither the original nor the new file"
        assert read(store, PAGE, PAGE) == OLD[PAGE : 2 * PAGE], "the original store moved too"


def test_unlinked_file_still_reads(path: Path) -> None:
    with FileStore(path) as store:
        path.unlink()
        with store.reopen() as again:  # the path is gone; the open file is not
            assert read(again, 2 * PAGE - 5, PAGE) == OLD[2 * PAGE - 5 : 3 * PAGE - 5]
            address = again.address(PAGE, PAGE)
            assert address is not None, "the mmap fast path was lost for an intact file"
            assert ctypes_at(address, PAGE) == OLD[PAGE : 2 * PAGE], "mapped the wrong bytes"


def ctypes_at(address: int, length: int) -> bytes:
    import ctypes

    return ctypes.string_at(address, length)


def test_grown_file_keeps_the_recorded_size(path: Path) -> None:
    with FileStore(path) as store, path.open("ab") as out:
        out.write(b"\x01" * 1000)
        out.flush()
        reopened = store.reopen()
        assert reopened.size == len(OLD), "reopen() took the file's new size"
        buffer = bytearray(b"\xa5" * 500)
        assert reopened.read_into(len(OLD) - 100, memoryview(buffer)) == 100
        assert buffer[:100] == OLD[-100:] and buffer[100:] == b"\xa5" * 400, "read past the size"
        reopened.close()


def test_truncated_file_raises_naming_the_offset(path: Path) -> None:
    with FileStore(path) as store:
        os.truncate(path, 2 * PAGE + 10)
        assert read(store, 0, PAGE) == OLD[:PAGE], "a range still inside the file must read"
        for handle in (store, store.reopen()):
            with pytest.raises(StoreError) as caught:
                handle.read_into(2 * PAGE, memoryview(bytearray(PAGE)))
            message = str(caught.value)
            assert caught.value.errno == errno.ESTALE, f"errno {caught.value.errno}: {message}"
            assert str(path) in message, f"the path is not named: {message}"
            assert f"at {2 * PAGE + 10}" in message, f"the offset is not named: {message}"
            assert f"({2 * PAGE + 10} bytes)" in message, f"the current size is not: {message}"


def test_address_is_none_past_the_current_end(path: Path) -> None:
    with FileStore(path) as store:
        assert store.address(3 * PAGE, PAGE) is not None, "fast path off for an intact file"
        os.truncate(path, 2 * PAGE)
        assert store.address(0, 2 * PAGE) is not None, "fast path off inside the current end"
        assert store.address(2 * PAGE, PAGE) is None, "an address past the file's end would fault"
        assert store.address(PAGE, 2 * PAGE) is None, "a range crossing the end would fault"
        with store.reopen() as again:  # a new handler: no mapping yet, the file already short
            assert again.address(3 * PAGE, PAGE) is None
            address = again.address(0, PAGE)
            assert address is not None, "no fast path inside a shrunk file's current end"
            assert ctypes_at(address, PAGE) == OLD[:PAGE]
            assert again.address(2 * PAGE, PAGE) is None, "past the shorter mapping"


def test_from_fd_reads_the_file_and_leaves_the_descriptor(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        store = FileStore.from_fd(fd)
        assert store.path == str(path), f"path from /proc: {store.path!r}"
        replace_with(path, NEW)
        assert read(store.reopen(), 0, len(OLD)) == OLD, "from_fd store read the new file"
        store.close()
        assert os.pread(fd, 4, 0) == OLD[:4], "closing the store closed the caller's descriptor"
    finally:
        os.close(fd)
    named = FileStore.from_fd(os.open(path, os.O_RDONLY), path="weights")
    assert "weights" in repr(named)
    named.close()


def test_closed_file_store_refuses(path: Path) -> None:
    store = FileStore(path)
    store.close()
    with pytest.raises(StoreError, match="closed") as caught:
        store.read_into(0, memoryview(bytearray(1)))
    assert caught.value.errno == errno.EBADF
    with pytest.raises(StoreError, match="closed"):
        store.reopen()
    assert store.address(0, PAGE) is None


def test_negative_offset_is_einval(path: Path) -> None:
    with FileStore(path) as store, pytest.raises(StoreError, match="offset -1 is negative") as e:
        store.read_into(-1, memoryview(bytearray(1)))
    assert e.value.errno == errno.EINVAL


def test_replaced_pack_reopened_reads_the_original(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "new").write_bytes(NEW)
    pack(tmp_path / "old", tmp_path / "data.pack", chunk_size=PAGE)
    with ZstdStore(FileStore(tmp_path / "data.pack")) as store:
        pack(tmp_path / "new", tmp_path / "data.pack", chunk_size=PAGE)  # renamed over it
        with store.reopen() as again:
            assert read(again, 0, len(OLD)) == OLD, "the reopened pack read the new pack"


def test_pack_rewritten_in_place_fails_never_wrong_bytes(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "new").write_bytes(NEW)
    pack(tmp_path / "old", tmp_path / "old.pack", chunk_size=PAGE)
    pack(tmp_path / "new", tmp_path / "new.pack", chunk_size=PAGE)
    new_pack = (tmp_path / "new.pack").read_bytes()
    with ZstdStore(FileStore(tmp_path / "old.pack")) as store:
        with (tmp_path / "old.pack").open("r+b") as out:  # the same inode, other bytes
            out.write(new_pack)
            out.truncate()
        with store.reopen() as again, pytest.raises(StoreError, match="pack chunk 1") as caught:
            read(again, PAGE, PAGE)
        assert caught.value.errno in (errno.EIO, errno.ESTALE), str(caught.value)


# --- http:// against a real nginx: If-Match on every ranged GET ---------------------------------


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[_servers.Nginx, Path]]:
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "data.bin").write_bytes(OLD)
    with _servers.nginx(tmp_path / "root", tmp_path / "prefix") as server:
        yield server, tmp_path / "root" / "data.bin"


def replace_and_age(path: Path, data: bytes) -> None:
    """Replace ``path`` so nginx's ETag (mtime in seconds, size) surely changes."""
    mtime = path.stat().st_mtime
    replace_with(path, data)
    os.utime(path, (mtime + 10, mtime + 10))


@pytest.mark.timeout(60)
def test_http_replaced_file_is_estale_never_the_new_bytes(
    http_store: Callable[..., Store], web: tuple[_servers.Nginx, Path]
) -> None:
    server, path = web
    url = f"{server.url}/data.bin"
    store = http_store(url, tries=3, backoff=5)  # a retry would take 5 s
    old_etag = fsspec.filesystem("http", skip_instance_cache=True).info(url)["ETag"]
    assert read(store, FAR, PAGE) == OLD[FAR : FAR + PAGE]
    replace_and_age(path, NEW)
    new_etag = fsspec.filesystem("http", skip_instance_cache=True).info(url)["ETag"]
    assert new_etag != old_etag, "the test did not change nginx's ETag"
    buffer = bytearray(b"\xa5" * PAGE)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.read_into(FAR + PAGE, memoryview(buffer))
    assert time.monotonic() - started < 4, "a 412 was retried"
    message = str(caught.value)
    assert caught.value.errno == errno.ESTALE, f"errno {caught.value.errno}: {message}"
    assert f"changed since it was opened (ETag {old_etag} -> {new_etag})" in message, message
    assert url in message, message
    assert buffer == b"\xa5" * PAGE, "bytes of the new file reached the buffer"
    gets = [row for row in server.requests("data.bin") if row[0] == "GET"]
    assert [status for _, status, _, _ in gets] == [206, 206, 412], f"requests: {gets}"
    # A restarted handler's reopen() asks nothing (every read is If-Match): the head it kept is
    # the opened version, and its first read past the head is refused, never the new bytes.
    before = len(server.requests("data.bin"))
    again = store.reopen()
    assert read(again, 0, PAGE) == OLD[:PAGE], "the kept head is not the opened version"
    with pytest.raises(StoreError, match="changed since it was opened") as reopened:
        again.read_into(FAR + 2 * PAGE, memoryview(buffer))
    assert reopened.value.errno == errno.ESTALE
    assert buffer == b"\xa5" * PAGE, "bytes of the new file reached the reopened store's buffer"
    rows = server.requests("data.bin")[before:]
    # The 412, then one HEAD to say what changed.
    assert [(m, status) for m, status, *_ in rows] == [("GET", 412), ("HEAD", 200)], rows


@pytest.mark.timeout(60)
def test_http_reopen_of_an_unchanged_file_reads(
    http_store: Callable[..., Store], web: tuple[_servers.Nginx, Path]
) -> None:
    server, _ = web
    store = http_store(f"{server.url}/data.bin", headers={"X-Trace": "pinning"})
    version = getattr(store, "_version", None)
    assert isinstance(version, _Version) and version.etag is not None, "nginx sent no ETag"
    # Every read carries the condition, next to the caller's headers (tests/stores/test_http.py).
    assert _http_conditions(version) == {"If-Match": version.etag}, version
    with store.reopen() as again:
        assert read(again, 0, len(OLD)) == OLD, "an unchanged file read wrong"
    rows = server.requests("data.bin")
    assert rows == [
        ("GET", 206, f"bytes=0-{_HEAD_BYTES - 1}", _HEAD_BYTES),  # the open: no HEAD
        ("GET", 206, f"bytes={_HEAD_BYTES}-{len(OLD) - 1}", len(OLD) - _HEAD_BYTES),
    ], f"requests: {rows}"


@pytest.mark.timeout(60)
def test_replaced_between_open_and_the_handlers_first_read_poisons(
    web: tuple[_servers.Nginx, Path],
) -> None:
    """lazy(url) opens (one GET: size, ETag, the first 64 KiB); the file is replaced before any
    page is touched; the handler (forked, its reopen() asking nothing) then serves the pages
    the open brought, which are the opened version, and poisons the first page past them
    (412): the program sees the old bytes or SIGBUS, never the new bytes next to the old."""
    server, path = web
    url = f"{server.url}/data.bin"

    def body(channel: Channel) -> None:
        view = lazy(url, policy=Single())
        replace_and_age(path, NEW)
        channel.send(bytes(view[:PAGE]))
        channel.send(bytes(view[FAR : FAR + PAGE]))  # SIGBUS here

    with Target(body, timeout=30) as target:
        (first, _) = target.recv()
        assert first == OLD[:PAGE], "page 0 is not the opened version's"
        status = target.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
            f"the page past the head ended with status {status}, not SIGBUS (a poisoned page)"
        )
    # The open's GET; the handler's one read past the head, refused; one HEAD for the message.
    rows = [row[:3] for row in server.requests("data.bin")]
    assert rows == [
        ("GET", 206, f"bytes=0-{_HEAD_BYTES - 1}"),
        ("GET", 412, f"bytes={FAR}-{FAR + PAGE - 1}"),
        ("HEAD", 200, "-"),
    ], rows


@pytest.mark.timeout(60)
def test_http_shrunk_file_is_estale(
    http_store: Callable[..., Store], web: tuple[_servers.Nginx, Path]
) -> None:
    server, path = web
    store = http_store(f"{server.url}/data.bin")
    replace_and_age(path, OLD[: FAR + 2 * PAGE])
    with pytest.raises(StoreError, match="changed since it was opened") as caught:
        store.read_into(FAR, memoryview(bytearray(PAGE)))  # inside the new file too: stale
    assert caught.value.errno == errno.ESTALE, str(caught.value)
    assert f"size {len(OLD)} -> {FAR + 2 * PAGE}" in str(caught.value), str(caught.value)


@pytest.mark.timeout(60)
def test_http_replaced_pack_fails_through_the_zstd_store(tmp_path: Path) -> None:
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    root = tmp_path / "root"
    root.mkdir()
    # Incompressible, so that chunk 20's frame lies past the head the open read.
    old, new = noisy_bytes(len(OLD), seed=1), noisy_bytes(len(OLD), seed=2)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    pack(tmp_path / "old", root / "data.pack", chunk_size=PAGE)
    with _servers.nginx(root, tmp_path / "prefix") as server:
        store = open_store(f"{server.url}/data.pack")
        assert isinstance(store, ZstdStore)
        assert store._layout.offsets[20] > _HEAD_BYTES, "chunk 20 lies inside the head"
        mtime = (root / "data.pack").stat().st_mtime
        pack(tmp_path / "new", root / "data.pack", chunk_size=PAGE)
        os.utime(root / "data.pack", (mtime + 10, mtime + 10))
        assert read(store, 0, PAGE) == old[:PAGE], "chunk 0, in the head, is not the opened pack's"
        for handle in (store, store.reopen()):  # reopen() asks nothing: its read is refused
            with pytest.raises(StoreError, match=r"pack chunk 20: .*changed since") as caught:
                handle.read_into(20 * PAGE, memoryview(bytearray(PAGE)))
            assert caught.value.errno == errno.ESTALE, str(caught.value)


def test_http_conditions_and_changes() -> None:
    strong = _Version(10, etag='"abc"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    assert _http_conditions(strong) == {"If-Match": '"abc"'}
    weak = dataclasses.replace(strong, etag='W/"abc"')  # If-Match never matches a weak ETag
    assert _http_conditions(weak) == {"If-Unmodified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}
    assert _http_conditions(_Version(10)) == {}, "no identity: only the size can be checked"
    assert strong.changes(strong) == []
    assert strong.changes(_Version(11, etag='"def"')) == ['ETag "abc" -> "def"', "size 10 -> 11"]
    assert strong.changes(None) == ['ETag "abc" -> ?']
    assert _Version(10).changes(_Version(10, etag='"x"')) == [], "a new ETag alone is no change"
    assert _Version(10).changes(_Version(9)) == ["size 10 -> 9"]


# --- s3:// against moto: IfMatch, or the pinned VersionId --------------------------------------


@pytest.mark.timeout(60)
def test_s3_overwritten_object_is_estale(s3: S3) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.options)
    fs.pipe_file("test/pin-plain.bin", OLD)
    store = FsspecStore("s3://test/pin-plain.bin", backoff=5, **s3.options)
    assert read(store, FAR, PAGE) == OLD[FAR : FAR + PAGE]
    fs.pipe_file("test/pin-plain.bin", NEW)
    buffer = bytearray(b"\xa5" * PAGE)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"changed since it was opened \(ETag ") as caught:
        store.read_into(FAR + PAGE, memoryview(buffer))
    assert time.monotonic() - started < 4, "a 412 was retried"
    assert caught.value.errno == errno.ESTALE, str(caught.value)
    assert buffer == b"\xa5" * PAGE, "bytes of the new object reached the buffer"
    again = store.reopen()  # asks nothing: every GetObject carries IfMatch
    assert read(again, 0, PAGE) == OLD[:PAGE], "the kept head is not the opened version"
    with pytest.raises(StoreError, match="changed since it was opened") as reopened:
        again.read_into(FAR, memoryview(buffer))
    assert reopened.value.errno == errno.ESTALE
    assert buffer == b"\xa5" * PAGE, "bytes of the new object reached the reopened store"


@pytest.mark.timeout(60)
def test_s3_open_is_one_request_and_reopen_none(s3: S3) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.options)
    fs.pipe_file("test/pin-open.bin", OLD)
    before = len(s3.requests("pin-open.bin"))
    store = FsspecStore("s3://test/pin-open.bin", **s3.options)
    again = store.reopen()
    assert read(again, 0, _HEAD_BYTES) == OLD[:_HEAD_BYTES], "the head is not the object's"
    rows = s3.requests("pin-open.bin", at_least=before + 1)[before:]
    assert rows == [("GET", 206)], f"open, reopen and a read of the head: not one GET: {rows}"
    assert read(again, FAR, PAGE) == OLD[FAR : FAR + PAGE]
    rows = s3.requests("pin-open.bin", at_least=before + 2)[before:]
    assert rows == [("GET", 206), ("GET", 206)], f"a read past the head: {rows}"


@pytest.mark.timeout(60)
def test_s3_versioned_bucket_keeps_serving_the_opened_version(s3: S3) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.options)
    if not fs.exists("pinned-versions"):
        fs.mkdir("pinned-versions")
    fs.call_s3(
        "put_bucket_versioning",
        Bucket="pinned-versions",
        VersioningConfiguration={"Status": "Enabled"},
    )
    fs.pipe_file("pinned-versions/data.bin", OLD)
    store = FsspecStore("s3://pinned-versions/data.bin", **s3.options)
    fs.pipe_file("pinned-versions/data.bin", NEW)
    assert fs.cat_file("pinned-versions/data.bin") == NEW, "the overwrite did not happen"
    assert read(store, 0, len(OLD)) == OLD, "the store read the new version"
    with store.reopen() as again:  # the opened version still exists: nothing is stale
        assert read(again, PAGE, PAGE) == OLD[PAGE : 2 * PAGE], "reopen() read the new version"

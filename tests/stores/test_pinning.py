"""A store is pinned to the bytes it opened: replaced, unlinked, shrunk or overwritten sources
give the original bytes or a StoreError, never the new bytes, a mix, or zeros."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from userfaultfd.stores import FileStore, Store, StoreError, ZstdStore, pack

PAGE = mmap.PAGESIZE


def position_bytes(size: int, salt: int = 0) -> bytes:
    """Bytes that depend on their position (and ``salt``) and are never zero."""
    return bytes(1 + (i * 7 + i // 251 + salt) % 255 for i in range(size))


OLD = position_bytes(5 * PAGE + 123)
NEW = position_bytes(len(OLD), salt=100)  # same size: only the bytes tell them apart
assert OLD != NEW and 0 not in OLD and 0 not in NEW


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

"""open_store picks the store for a Store, bytes, a path or a URL, and spots packs by magic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.stores._checks import assert_range
from tests.stores.conftest import Served, make_payload
from userfaultfd.stores import (
    BytesStore,
    FileStore,
    FsspecStore,
    HttpStore,
    StoreError,
    ZstdStore,
    open_store,
    pack,
)

DATA = make_payload(50_000, seed=3)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_bytes(DATA)
    pack(tmp_path / "plain", tmp_path / "packed", chunk_size=8192)
    return tmp_path


def test_a_store_passes_through() -> None:
    store = BytesStore(DATA)
    assert open_store(store) is store


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_gives_a_bytes_store(kind: type[bytes | bytearray | memoryview]) -> None:
    store = open_store(kind(DATA))
    assert isinstance(store, BytesStore)
    assert_range(store, DATA, 49_000, 4096)


def test_paths(files: Path) -> None:
    for source in (files / "plain", str(files / "plain"), f"file://{files}/plain"):
        with open_store(source) as store:
            assert isinstance(store, FileStore)
            assert_range(store, DATA, 100, 30_000)
    for source in (files / "packed", str(files / "packed"), f"file://{files}/packed"):
        with open_store(source) as store:
            assert isinstance(store, ZstdStore) and store.chunk_size == 8192
            assert_range(store, DATA, 100, 30_000)


def test_short_and_empty_files_are_plain(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"UFFD")
    assert open_store(tmp_path / "empty").size == 0
    assert isinstance(open_store(tmp_path / "short"), FileStore)


def test_a_file_with_the_magic_but_no_pack_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "fake").write_bytes(b"UFFDZST1" + bytes(100))
    with pytest.raises(StoreError, match="pack format version 0 is not supported"):
        open_store(tmp_path / "fake")


def test_urls_give_fsspec_stores(files: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("memory://open-store/plain", DATA)
    fs.pipe_file("memory://open-store/packed", (files / "packed").read_bytes())
    try:
        plain = open_store("memory://open-store/plain")
        assert isinstance(plain, FsspecStore)
        packed = open_store("memory://open-store/packed", tries=1)
        assert isinstance(packed, ZstdStore)
        assert_range(packed, DATA, 8000, 400)
    finally:
        fs.rm("memory://open-store", recursive=True)


def test_missing_path_and_misplaced_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing")
    with pytest.raises(TypeError, match=r"options \['anon'\] apply only to URLs"):
        open_store(tmp_path / "missing", anon=True)
    with pytest.raises(TypeError, match="apply only to URLs"):
        open_store(b"abc", anon=True)


def test_http_urls_give_http_stores_unless_the_options_need_fsspec(served: Served) -> None:
    url = served.url("data.bin")
    plain: dict[str, Any] = {"tries": 1, "timeout": 5.0, "headers": {"X-Trace": "open"}}
    for options in ({}, plain):
        with open_store(url, **options) as direct:
            assert isinstance(direct, HttpStore), f"{options}: {direct!r}"
            assert_range(direct, served.payload, 70_000, 4096)
    # An option only aiohttp takes: fsspec's client, pinned and read the same way.
    with open_store(url, client_kwargs={"trust_env": False}) as via:
        assert isinstance(via, FsspecStore), via
        assert_range(via, served.payload, 70_000, 4096)

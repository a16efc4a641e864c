"""The public surface of userfaultfd.stores, pinned: a change here is a change of the API."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import userfaultfd.stores
from tests.stores.conftest import Served
from userfaultfd.stores import BytesStore, StoreError, pack

ROOT = Path(__file__).resolve().parents[2]


def test_stores_surface() -> None:
    assert sorted(userfaultfd.stores.__all__) == [
        "BytesStore",
        "ChunkCache",
        "ChunkedStore",
        "FileStore",
        "FsspecStore",
        "HttpStore",
        "PackInfo",
        "Store",
        "StoreError",
        "ZstdStore",
        "open_store",
        "pack",
    ]
    for name in userfaultfd.stores.__all__:
        assert getattr(userfaultfd.stores, name).__module__.startswith("userfaultfd.stores.")


# Run in a fresh interpreter: records who first imports fsspec (the innermost frame of this
# package on the stack when it is imported), then opens and reads a local file store.
_NO_FSSPEC = """
import sys, traceback

class Spy:
    who = None

    def find_spec(self, name, path=None, target=None):
        if Spy.who is None and name.split(".")[0] == "fsspec":
            frames = [f for f in traceback.extract_stack() if "/userfaultfd/" in f.filename]
            Spy.who = "; ".join(f"{f.filename}:{f.lineno}: {f.line}" for f in frames[-3:])
        return None

sys.meta_path.insert(0, Spy())
import userfaultfd, userfaultfd.runtime, userfaultfd.stores
from userfaultfd.stores import ChunkCache, open_store
with open_store(sys.argv[1]) as store:
    buffer = bytearray(store.size)
    assert store.read_into(0, memoryview(buffer)) == store.size and buffer == b"local bytes"
if "fsspec" in sys.modules:
    sys.exit(f"fsspec was imported by {Spy.who or 'something outside userfaultfd'}")
"""


def test_a_local_store_does_not_import_fsspec(tmp_path: Path) -> None:
    """fsspec registers an at-fork hook when imported: a program serving a local file must not
    pay for it (nor have it run in its handler's fork)."""
    (tmp_path / "local").write_bytes(b"local bytes")
    done = subprocess.run(
        [sys.executable, "-c", _NO_FSSPEC, str(tmp_path / "local")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


# Run in a fresh interpreter: opens http:// URLs (a file, a single-file pack, a content-addressed
# pack) with open_store, reads them whole, and fails naming who imported fsspec or aiohttp.
_NO_FSSPEC_OVER_HTTP = """
import sys, traceback

class Spy:
    who = None

    def find_spec(self, name, path=None, target=None):
        if Spy.who is None and name.split(".")[0] in ("fsspec", "aiohttp"):
            frames = [f for f in traceback.extract_stack() if "/userfaultfd/" in f.filename]
            where = [f"{f.filename}:{f.lineno}: {f.line}" for f in frames[-3:]]
            Spy.who = f"{name}: " + "; ".join(where)
        return None

sys.meta_path.insert(0, Spy())
from userfaultfd.stores import ChunkedStore, HttpStore, ZstdStore, open_store
base, expected = sys.argv[1], open(sys.argv[2], "rb").read()
kinds = {"data.bin": HttpStore, "data.pack": ZstdStore, "nofs/c.index": ChunkedStore}
for name, kind in kinds.items():
    with open_store(f"{base}/{name}") as store:
        assert isinstance(store, kind), (name, store)
        buffer = bytearray(store.size)
        assert store.read_into(0, memoryview(buffer)) == len(expected), name
        assert buffer == expected, f"{name}: wrong bytes"
        if name == "data.bin":
            again = store.reopen()
            assert again.read_into(len(expected) - 10, memoryview(buffer)) == 10, "reopened"
            again.close()
if Spy.who is not None:
    sys.exit(f"imported by {Spy.who}")
"""


def test_http_urls_import_no_fsspec(served: Served, tmp_path: Path) -> None:
    """open_store over HTTP (plain options) gives stores that read by http.client: neither
    fsspec nor aiohttp is imported, so no at-fork hook of theirs runs in the program or its
    handler."""
    if not (served.root / "nofs" / "c.index").exists():
        pack(BytesStore(served.payload), served.root / "nofs" / "c.index", layout="chunks")
    (tmp_path / "expected").write_bytes(served.payload)
    done = subprocess.run(
        [sys.executable, "-c", _NO_FSSPEC_OVER_HTTP, served.server.url, str(tmp_path / "expected")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_lazy_names_still_import() -> None:
    from userfaultfd.stores import ChunkedStore, FsspecStore

    assert FsspecStore.__module__ == "userfaultfd.stores._fsspec"
    assert ChunkedStore.__module__ == "userfaultfd.stores._chunked"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchStore'"):
        userfaultfd.stores.NoSuchStore  # noqa: B018


def test_store_error_takes_oserrors_order() -> None:
    err = StoreError(errno.ESTALE, "s3://b/k: the object changed")
    assert isinstance(err, OSError) and err.errno == errno.ESTALE, err
    assert err.strerror == "s3://b/k: the object changed" and str(err) == (
        f"[Errno {errno.ESTALE}] s3://b/k: the object changed"
    )
    back = pickle.loads(pickle.dumps(err))  # a handler's failure crosses processes
    assert type(back) is StoreError and back.args == err.args, back.args

"""Shared data and servers for the store tests (session-scoped: each server starts once)."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stores import _servers
from userfaultfd.stores import FsspecStore, HttpStore, Store, pack

#: Chunk size of the served pack: small, so short ranges cross chunk boundaries.
PACK_CHUNK = 64 << 10


def make_payload(size: int, seed: int = 1) -> bytes:
    """Half random, half repetitive bytes (so packs both shrink and carry incompressible frames)."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(rng.randrange(1, 40_000)))
        parts.append(bytes([rng.randrange(256)]) * rng.randrange(1, 40_000))
    return b"".join(parts)[:size]


@pytest.fixture(scope="session")
def payload() -> bytes:
    # Not a multiple of the chunk size or of a page: the last chunk and the last page are short.
    return make_payload(700_001)


@dataclasses.dataclass(frozen=True, slots=True)
class Served:
    """A directory of test files behind a live nginx."""

    server: _servers.Nginx
    root: Path
    payload: bytes

    def url(self, name: str) -> str:
        return f"{self.server.url}/{name}"


def _write_files(root: Path, payload: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.bin").write_bytes(payload)
    pack(root / "data.bin", root / "data.pack", chunk_size=PACK_CHUNK)


@pytest.fixture(scope="session", params=[HttpStore, FsspecStore], ids=["HttpStore", "FsspecStore"])
def http_store(request: pytest.FixtureRequest) -> Callable[..., Store]:
    """Each store that reads HTTP: the direct one (what open_store gives), and fsspec's (what it
    gives for options the direct one does not take)."""
    made: Callable[..., Store] = request.param
    return made


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, payload: bytes) -> Iterator[Served]:
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    base = tmp_path_factory.mktemp("nginx")
    _write_files(base / "root", payload)
    with _servers.nginx(base / "root", base / "prefix") as server:
        yield Served(server, base / "root", payload)


@pytest.fixture
def own_nginx(tmp_path: Path, payload: bytes) -> Iterator[Served]:
    """An nginx of the test's own, which it may kill."""
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    _write_files(tmp_path / "root", payload)
    with _servers.nginx(tmp_path / "root", tmp_path / "prefix") as server:
        yield Served(server, tmp_path / "root", payload)


@dataclasses.dataclass(frozen=True, slots=True)
class S3:
    """A moto S3 endpoint with bucket ``test`` holding data.bin and data.pack."""

    options: dict[str, Any]
    payload: bytes
    log: Path  # moto's request log: one line per request, method, path and status

    def requests(self, key: str, *, at_least: int = 0) -> list[tuple[str, int]]:
        """(method, status) of every request for ``key`` in bucket ``test``, in order, once there
        are ``at_least`` of them (or 10 s passed): moto writes a request's line a while after
        its answer, under load more than 100 ms after."""
        deadline = time.monotonic() + 10
        while True:
            # werkzeug colours the lines of some answers (206) with ANSI escapes, in some
            # environments (a fresh CI run did, a terminal session not): those are taken out.
            log = re.sub(r"\x1b\[[0-9;]*m", "", _servers.settled_log(self.log))
            found = re.findall(rf'"(\w+) /test/{re.escape(key)}[ ?][^"]*" (\d+)', log)
            if len(found) >= at_least or time.monotonic() > deadline:
                return [(method, int(status)) for method, status in found]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory, payload: bytes) -> Iterator[S3]:
    import fsspec

    base = tmp_path_factory.mktemp("moto")
    _write_files(base / "files", payload)
    with _servers.moto_server(base / "moto.log") as endpoint:
        options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            # Not us-east-1: s3fs would send it as a LocationConstraint, which S3 refuses.
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
        }
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir("test")
        for name in ("data.bin", "data.pack"):
            fs.pipe_file(f"test/{name}", (base / "files" / name).read_bytes())
        yield S3(options, payload, base / "moto.log")

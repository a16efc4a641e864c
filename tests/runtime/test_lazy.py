"""lazy(): arrays that fill on demand from files, packs and HTTP, through every policy."""

from __future__ import annotations

import gc
import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests._target import PAGE
from tests.runtime.test_serve import POLICIES, in_target
from tests.stores import _servers
from userfaultfd.runtime import Policy, lazy, server_of
from userfaultfd.stores import pack


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A directory with data.bin (4 MiB + 1234 bytes, not a page multiple), its pack, and
    an .npy file."""
    root = tmp_path_factory.mktemp("lazy")
    rng = random.Random(31)
    data = b"".join(rng.randbytes(4096) + bytes([i % 251]) * 4096 for i in range(512)) + b"x" * 1234
    (root / "data.bin").write_bytes(data)
    pack(root / "data.bin", root / "data.pack", chunk_size=256 << 10)
    np.save(root / "matrix.npy", np.arange(300_000, dtype=np.float32).reshape(600, 500))
    return root, data


def digest_of(source: str, policy: Policy) -> str:
    """Lazily map ``source`` in a forked target and hash every byte of it there."""

    def body() -> str:
        view = lazy(source, policy=policy)
        return hashlib.sha256(view).hexdigest()

    result: str = in_target(body)
    return result


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_a_zstd_pack_is_served_byte_for_byte(sources: tuple[Path, bytes], policy: Policy) -> None:
    root, data = sources
    assert digest_of(str(root / "data.pack"), policy) == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def http(sources: tuple[Path, bytes], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx; .ci/run installs it)")
    root, _ = sources
    with _servers.nginx(root, tmp_path_factory.mktemp("nginx-prefix")) as server:
        yield server.url


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_an_http_url_is_served_byte_for_byte(
    sources: tuple[Path, bytes], http: str, policy: Policy
) -> None:
    _, data = sources
    assert digest_of(f"{http}/data.bin", policy) == hashlib.sha256(data).hexdigest()


def test_a_pack_over_http_is_served(sources: tuple[Path, bytes], http: str) -> None:
    _, data = sources
    assert digest_of(f"{http}/data.pack", POLICIES[2]) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "handler"])
def test_npy_header_gives_shape_and_dtype(sources: tuple[Path, bytes], direct: bool) -> None:
    root, _ = sources
    path = str(root / "matrix.npy")

    def body() -> tuple[tuple[int, ...], str, bool]:
        array = lazy(path, direct=direct)
        return array.shape, str(array.dtype), bool(np.array_equal(array, np.load(path)))

    assert in_target(body) == ((600, 500), "float32", True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "handler"])
def test_dtype_and_shape_view_raw_bytes(sources: tuple[Path, bytes], direct: bool) -> None:
    root, data = sources
    path = str(root / "data.bin")

    def body() -> tuple[tuple[int, ...], int]:
        array = lazy(path, dtype=np.uint32, shape=(4, 1024), direct=direct)
        return array.shape, int(array[1, 0])

    first_word = int.from_bytes(data[4096:4100], "little")
    assert in_target(body) == ((4, 1024), first_word)


def test_the_handler_stops_when_the_array_goes(sources: tuple[Path, bytes]) -> None:
    root, _ = sources

    def body() -> tuple[bool, bool]:
        view = lazy(str(root / "data.bin"), direct=False)
        server = server_of(view)
        _ = view[0]
        pid = server.pid
        del view, server
        gc.collect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True, True
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return True, True
            except ChildProcessError:
                return True, True
            time.sleep(0.01)
        return False, False

    assert in_target(body) == (True, True)


def test_bad_requests_are_clear_errors(sources: tuple[Path, bytes], tmp_path: Path) -> None:
    root, _ = sources
    with pytest.raises(ValueError, match="defines its own shape and dtype"):
        lazy(str(root / "matrix.npy"), dtype=np.float64)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        lazy(str(empty))
    with pytest.raises(ValueError, match="needs"):
        lazy(str(root / "data.bin"), dtype=np.float64, shape=(10**7,))
    with pytest.raises(ValueError, match="not memory returned by lazy"):
        server_of(np.zeros(3))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "handler"])
def test_memoryview_length_is_the_source_length(sources: tuple[Path, bytes], direct: bool) -> None:
    root, data = sources

    def body() -> tuple[int, bytes]:
        view = lazy(str(root / "data.bin"), direct=direct)
        return len(view), bytes(view[-1234:])

    assert in_target(body) == (len(data), b"x" * 1234)
    assert len(data) % PAGE == 1234


def test_uffd_lazy_touches_every_page_and_reports(sources: tuple[Path, bytes]) -> None:
    import subprocess
    import sys

    root, data = sources
    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "lazy", str(root / "data.bin"), "--order", "random",
         "--policy", "window:8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pages = -(-len(data) // PAGE)
    assert f"{pages} pages, random, window:8" in done.stdout
    [filled] = [line for line in done.stdout.splitlines() if "pages filled" in line]
    assert f" {pages:,} " in filled


def test_uffd_lazy_bad_policy_is_one_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "lazy", "/nonexistent", "--policy", "sideways"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("uffd: ")

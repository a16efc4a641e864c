"""Firecracker's page-fault handler protocol: the message decoder, a Python client and a C one."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._target import PAGE, Channel, Target
from userfaultfd import Mode, Userfaultfd, memory
from userfaultfd.runtime import GuestRegion, parse_regions

HERE = os.path.dirname(os.path.abspath(__file__))


def message(*regions: dict[str, int]) -> bytes:
    return json.dumps(list(regions)).encode()


def test_a_firecracker_message_decodes() -> None:
    data = message(
        {"base_host_virt_addr": 0x7F0000000000, "size": 8 * PAGE, "offset": 0, "page_size": PAGE},
        {"base_host_virt_addr": 0x7F0000100000, "size": PAGE, "offset": 8 * PAGE,
         "page_size": PAGE},
    )  # fmt: skip
    assert parse_regions(data) == [
        GuestRegion(0x7F0000000000, 8 * PAGE, 0, PAGE),
        GuestRegion(0x7F0000100000, PAGE, 8 * PAGE, PAGE),
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[]", "non-empty JSON array"),
        (b'{"a": 1}', "non-empty JSON array"),
        (b"[1]", "region 0 is not an object"),
        (message({"base_host_virt_addr": 0, "size": PAGE, "offset": 0}), "page_size must be"),
        (message({"base_host_virt_addr": 0, "size": PAGE, "offset": -1, "page_size": PAGE}),
         "offset must be a non-negative integer"),
        (message({"base_host_virt_addr": 0, "size": PAGE, "offset": 0, "page_size": 3000}),
         "not a power of two"),
        (message({"base_host_virt_addr": 1, "size": PAGE, "offset": 0, "page_size": PAGE}),
         "page multiples"),
        (message({"base_host_virt_addr": 0, "size": True, "offset": 0, "page_size": PAGE}),
         "size must be"),
    ],
)  # fmt: skip
def test_malformed_messages_say_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_regions(data)


@settings(deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        regions = parse_regions(data)
    except ValueError:
        return
    assert regions and all(isinstance(r, GuestRegion) for r in regions)


@settings(deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["base_host_virt_addr", "size", "offset",
                                                 "page_size", "x"]),
                                st.one_of(st.integers(-5, 1 << 40), st.text(max_size=3),
                                          st.none())), max_size=4))  # fmt: skip
def test_arbitrary_json_decodes_or_raises_value_error(items: list[dict[str, object]]) -> None:
    try:
        parse_regions(json.dumps(items).encode())
    except ValueError:
        pass


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def store_file(tmp_path: os.PathLike[str]) -> tuple[str, bytes]:
    data = random.Random(21).randbytes(64 * PAGE)
    path = os.path.join(os.fspath(tmp_path), "guest-memory")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


@pytest.fixture
def server(tmp_path: os.PathLike[str], store_file: tuple[str, bytes]) -> Iterator[str]:
    """``uffd serve --socket PATH STORE`` as a user runs it."""
    path = os.path.join(os.fspath(tmp_path), "uffd.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", path, store_file[0]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.01)
        yield path
    finally:
        process.kill()
        process.wait(10)


def test_python_client_is_served_both_regions(server: str, store_file: tuple[str, bytes]) -> None:
    _path, data = store_file
    half = 32 * PAGE

    def client(channel: Channel) -> None:
        mapping = memory.anonymous(2 * half)
        with Userfaultfd() as uffd:
            uffd.register(mapping.address, mapping.length, Mode.MISSING)
            regions = [
                {"base_host_virt_addr": mapping.address, "size": half, "offset": half,
                 "page_size": PAGE},
                {"base_host_virt_addr": mapping.address + half, "size": half, "offset": 0,
                 "page_size": PAGE},
            ]  # fmt: skip
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(server)
                socket.send_fds(connection, [json.dumps(regions).encode()], [uffd.fileno()])
                channel.send(hashlib.sha256(mapping.view).hexdigest())

    with Target(client) as target:
        received, _ = target.recv()
        # Each region from its own store offset.
        assert received == hashlib.sha256(data[half:] + data[:half]).hexdigest()
        assert target.exit_code() == 0


def test_c_client_is_served_every_page(
    server: str, store_file: tuple[str, bytes], tmp_path: os.PathLike[str]
) -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler on this machine (.ci/run installs gcc)")
    binary = os.path.join(os.fspath(tmp_path), "fc_client")
    subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary,
         os.path.join(HERE, "c", "fc_client.c")],
        check=True, timeout=120,
    )  # fmt: skip
    path, data = store_file
    done = subprocess.run(
        [binary, server, path, str(len(data))], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"OK {len(data) // PAGE} pages"

"""Firecracker's page-fault handler protocol: the message decoder, a Python client and a C one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._target import PAGE, Channel, Target
from userfaultfd import Mode, Userfaultfd, memory
from userfaultfd.runtime._socket import check_regions
from userfaultfd.runtime.firecracker import GuestRegion, parse_regions, serve_socket
from userfaultfd.stores import BytesStore

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


def test_regions_inside_the_store_pass_the_check() -> None:
    store_size = 16 * PAGE + 100  # the last page is mostly padding
    check_regions([GuestRegion(0, 8 * PAGE, 0, PAGE), GuestRegion(0, 9 * PAGE, 8 * PAGE, PAGE),
                   GuestRegion(0, 2 * PAGE, 15 * PAGE, PAGE)],
                  store_size)  # fmt: skip


@pytest.mark.parametrize(
    ("region", "store_size"),
    [
        (GuestRegion(0, 16 * PAGE, 100 << 20, PAGE), 16 << 20),  # far past the end
        (GuestRegion(0, 2 * PAGE, 15 * PAGE, PAGE), 16 * PAGE),  # a whole page past the end
        (GuestRegion(0, 2 * PAGE, 15 * PAGE, PAGE), 16 * PAGE - 1),
        (GuestRegion(0, PAGE, 20 * PAGE, PAGE), 16 * PAGE + 1),  # starts past the end
    ],
)
def test_regions_past_the_end_of_the_store_are_refused(
    region: GuestRegion, store_size: int
) -> None:
    """These regions were served as zeros past the store's end."""
    with pytest.raises(
        ValueError, match=r"region 1: bytes \[\d+, \d+\) lie past the end of the store"
    ):
        check_regions([GuestRegion(0, PAGE, 0, PAGE), region], store_size)


# -- end to end ---------------------------------------------------------------------------------


def guest_bytes(size: int) -> bytes:
    """Position-dependent bytes with no zero byte (a page served as zeros cannot pass)."""
    blocks = (hashlib.sha256(b"%d" % i).digest().replace(b"\0", b"\1") for i in range(size // 32))
    return b"".join(blocks)[:size]


@pytest.fixture
def store_file(tmp_path: os.PathLike[str]) -> tuple[str, bytes]:
    data = guest_bytes(64 * PAGE)
    assert 0 not in data
    path = os.path.join(os.fspath(tmp_path), "guest-memory")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def start_server(socket_path: str, store: str, log: str) -> subprocess.Popen[bytes]:
    """``uffd serve --socket PATH STORE`` as a user runs it, once it listens (stderr to ``log``)."""
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "userfaultfd", "serve", "--socket", socket_path, store],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while b"serving " not in read(log):
        if process.poll() is not None:
            raise AssertionError(read(log).decode())
        if time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise AssertionError("the server did not start listening")
        time.sleep(0.01)
    return process


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def server_log(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(os.fspath(tmp_path), "serve.log")


@pytest.fixture
def server(
    tmp_path: os.PathLike[str], store_file: tuple[str, bytes], server_log: str
) -> Iterator[str]:
    path = os.path.join(os.fspath(tmp_path), "uffd.sock")
    process = start_server(path, store_file[0], server_log)
    try:
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


def serve_client(server: str, regions: list[dict[str, int]], pages: int) -> Any:
    """A client that maps ``pages`` pages and sends ``regions`` (relative addresses) to the
    server; it reports ("refused", b"") if the server closed the connection without serving,
    else ("served", the bytes of its memory)."""

    def client(channel: Channel) -> None:
        mapping = memory.anonymous(pages * PAGE)
        with Userfaultfd() as uffd:
            uffd.register(mapping.address, mapping.length, Mode.MISSING)
            absolute = [{**r, "base_host_virt_addr": mapping.address + r["base_host_virt_addr"]}
                        for r in regions]  # fmt: skip
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.connect(server)
                socket.send_fds(connection, [json.dumps(absolute).encode()], [uffd.fileno()])
                connection.settimeout(5)
                try:
                    hung_up = connection.recv(1) == b""
                except TimeoutError:
                    hung_up = False  # still connected: the server is serving us
                if hung_up:
                    channel.send(("refused", b""))
                    return
                channel.send(("served", bytes(mapping.view)))

    with Target(client, timeout=30) as target:
        result, _ = target.recv(timeout=30)
        assert target.exit_code() == 0
        return result


def test_a_client_reaching_past_the_store_is_refused_and_others_still_served(
    server: str, store_file: tuple[str, bytes], server_log: str
) -> None:
    """A region at offset 100 MB of a 256 KiB store was served as zeros."""
    _path, data = store_file
    far = [{"base_host_virt_addr": 0, "size": 16 * PAGE, "offset": 100 << 20, "page_size": PAGE}]
    assert serve_client(server, far, 16) == ("refused", b"")
    # A region that starts inside the store and runs one page past its end: refused too.
    over = [{"base_host_virt_addr": 0, "size": 16 * PAGE, "offset": 49 * PAGE, "page_size": PAGE}]
    assert serve_client(server, over, 16) == ("refused", b"")
    log = read(server_log).decode()
    assert log.count("uffd serve: refused a client: region 0: bytes") == 2, log
    assert f"[{100 << 20}, {(100 << 20) + 16 * PAGE}) lie past the end of the store" in log
    # The server is still up, and serves the next client byte for byte.
    good = [{"base_host_virt_addr": 0, "size": 16 * PAGE, "offset": 48 * PAGE, "page_size": PAGE}]
    assert serve_client(server, good, 16) == ("served", data[48 * PAGE :])


# -- what is at the socket path -----------------------------------------------------------------


def uffd_serve(socket_path: str, store: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", socket_path, store],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_regular_file_at_the_socket_path_is_kept(
    tmp_path: os.PathLike[str], store_file: tuple[str, bytes]
) -> None:
    """uffd serve deleted whatever file was at --socket, a text file included."""
    path = os.path.join(os.fspath(tmp_path), "notes.txt")
    with open(path, "w") as f:
        f.write("my notes\n")
    done = uffd_serve(path, store_file[0])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    [line] = done.stderr.splitlines()
    assert line.startswith("uffd: ") and line.endswith(
        f"cannot listen on {path}: it exists and is not a socket"
    ), line
    assert read(path) == b"my notes\n"


def test_a_live_socket_at_the_path_is_kept(
    tmp_path: os.PathLike[str], store_file: tuple[str, bytes]
) -> None:
    """uffd serve unlinked the socket of a server still listening, stealing its path."""
    path = os.path.join(os.fspath(tmp_path), "live.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen(8)
        done = uffd_serve(path, store_file[0])
        assert done.returncode == 1 and "Traceback" not in done.stderr, done
        [line] = done.stderr.splitlines()
        assert line.startswith("uffd: ") and line.endswith(
            f"cannot listen on {path}: a server is listening there"
        ), line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # still the live server's socket
        assert live.accept()[0] is not None


def test_a_stale_socket_is_replaced(
    tmp_path: os.PathLike[str], store_file: tuple[str, bytes], server_log: str
) -> None:
    path = os.path.join(os.fspath(tmp_path), "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(path)  # closed without unlinking: what a killed server leaves behind
    process = start_server(path, store_file[0], server_log)
    try:
        _path, data = store_file
        region = [{"base_host_virt_addr": 0, "size": 4 * PAGE, "offset": 0, "page_size": PAGE}]
        assert serve_client(path, region, 4) == ("served", data[: 4 * PAGE])
    finally:
        process.kill()
        process.wait(10)


# -- what serve_socket leaves to its caller -------------------------------------------------------


def test_serve_socket_leaves_sigchld_and_the_callers_children_alone(
    tmp_path: os.PathLike[str],
) -> None:
    """serve_socket set SIGCHLD to SIG_IGN for the whole process: afterwards waitpid failed with
    ECHILD and subprocess reported return code 0 for any child, ``false`` included."""
    path = os.path.join(os.fspath(tmp_path), "once.sock")
    data = guest_bytes(4 * PAGE)

    def program(channel: Channel) -> None:  # serves one client in this process, then returns
        serve_socket(path, BytesStore(data), once=True, on_listening=lambda: channel.send("up"))
        false = subprocess.run(["false"], timeout=30).returncode
        channel.send((signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL, false))

    with Target(program, timeout=60) as server:
        assert server.recv(timeout=30)[0] == "up"
        assert serve_client(path, [{"base_host_virt_addr": 0, "size": 4 * PAGE, "offset": 0,
                                    "page_size": PAGE}], 4) == ("served", data)  # fmt: skip
        (default, false), _ = server.recv(timeout=30)
        assert server.exit_code() == 0
    assert false == 1, f"after serve_socket, subprocess said `false` returned {false}, not 1"
    assert default, "serve_socket left SIGCHLD changed in the process that called it"


def test_served_clients_leave_no_zombie(server: str, store_file: tuple[str, bytes]) -> None:
    _path, data = store_file
    region = [{"base_host_virt_addr": 0, "size": 4 * PAGE, "offset": 0, "page_size": PAGE}]
    for _ in range(3):
        assert serve_client(server, region, 4) == ("served", data[: 4 * PAGE])
    listening = next(
        int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _listens(int(pid), server)
    )
    deadline = time.monotonic() + 10
    while (children := _children(listening)) and time.monotonic() < deadline:
        time.sleep(0.01)  # a client's server may still be exiting
    assert children == [], f"uffd serve ({listening}) keeps children: {children}"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _listens(pid: int, socket_path: str) -> bool:
    """Whether process ``pid`` runs ``uffd serve --socket socket_path``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return False
    return b"serve" in words and os.fsencode(socket_path) in words

"""lazy_tensors(): what is fetched, when, and from where. A selection is never read (locally, over
HTTP with the bytes counted at nginx, and on the native path, which copies a selection from a
mapped file); a prefetch reads ahead what it names and nothing else; every tensor over nginx and
S3 (moto) against safe_open; a remote file replaced while a mapping is alive (the opened version's
bytes or SIGBUS, never the new ones, never zeros); a handler killed over HTTP.

Lazily filled memory is read only in forked targets with a deadline (in_target), never in the
pytest process.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target
from tests.runtime._tensor_files import (
    LoggedStore,
    difference,
    in_target,
    middle_pages,
    write_model,
)
from tests.stores import _servers
from userfaultfd._native import native_available
from userfaultfd.runtime import Adaptive, Single, _tensors, lazy_tensors, server_of
from userfaultfd.stores import FsspecStore, Store
from userfaultfd.stores._pinning import HEAD_BYTES

np = pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """A safetensors file and each tensor's bytes as safe_open gives them."""
    path = str(tmp_path_factory.mktemp("tensors") / "model.safetensors")
    return path, write_model(path)


def _spans(path: str) -> dict[str, tuple[int, int]]:
    """Each tensor's bytes [start, end) in the file, from the header alone."""
    return {n: (t.start, t.end) for n, t in lazy_tensors(path).infos.items()}


# --- selections and prefetch, locally ----------------------------------------------------------


def test_excluded_tensors_are_never_read(
    model: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    path, want = model
    log = str(tmp_path / "reads")
    # In the file: positions, embed, layers.0.mlp, layers.1.mlp, layers.0.attn, layers.1.attn,
    # the norms, scale (safetensors orders them by alignment, then name): some left out lie
    # between tensors selected, where a sequential reader's read-ahead would reach them.
    chosen = ["embed", "layers.1.mlp", "layers.1.attn", "layers.0.norm"]

    def body() -> tuple[str, list[tuple[int, int]], dict[str, tuple[int, int]], int]:
        store = LoggedStore(path, log)
        me = os.getpid()
        tensors = lazy_tensors(
            store, include=["embed", "layers.*"], exclude=["layers.0.[am]*", "layers.1.norm"]
        )
        found = difference(tensors, {n: want[n] for n in chosen})
        low = min(i.start for i in tensors.infos.values())
        everything = lazy_tensors(path)  # the header alone: where the others lie
        others = {
            n: middle_pages(everything.infos[n].start, everything.infos[n].end, low)
            for n in want
            if n not in chosen
        }
        filled = server_of(tensors["embed"]).stats().bytes
        return found, store.reads(not_by=me), others, filled

    found, reads, others, filled = in_target(body)
    assert found == ""
    assert reads, "the handler read nothing: the tensors came from somewhere else"
    for offset, length in reads:
        for name, (first, last) in others.items():
            assert not (offset < last and first < offset + length), (
                f"the handler read [{offset}, {offset + length}), inside {name}'s pages"
                f" [{first}, {last}), which was not selected"
            )
    selected = sum(len(want[n]) for n in chosen)
    assert filled <= selected + 2 * len(chosen) * PAGE, f"{filled} bytes filled for {selected}"


def test_prefetch_all_fills_every_tensor_before_it_is_touched(
    model: tuple[str, dict[str, bytes]],
) -> None:
    path, want = model

    def body() -> tuple[str, int, int]:
        tensors = lazy_tensors(path, prefetch="all")
        server = server_of(tensors["embed"])
        low = min(i.start for i in tensors.infos.values())
        high = max(i.end for i in tensors.infos.values())
        pages = -(-(high - low) // PAGE)
        deadline = time.monotonic() + 20
        while server.stats().prefetched < pages and time.monotonic() < deadline:
            time.sleep(0.01)
        prefetched = server.stats().prefetched
        found = difference(tensors, want)
        return found, prefetched - pages, server.stats().faults

    found, missing, faults = in_target(body)
    assert missing == 0, f"the prefetch left {-missing} pages out"
    assert found == ""
    assert faults == 0, f"{faults} faults on tensors that were all prefetched"


def test_prefetch_a_list_reads_those_tensors_ahead_and_nothing_else(
    model: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    path, want = model
    log = str(tmp_path / "reads")
    order = ["layers.1.mlp", "embed"]

    def body() -> tuple[str, list[tuple[int, int]], dict[str, tuple[int, int]], int, int]:
        store = LoggedStore(path, log)
        me = os.getpid()
        tensors = lazy_tensors(store, prefetch=order)
        server = server_of(tensors["embed"])
        need = sum(-(-len(want[n]) // PAGE) for n in order)
        deadline = time.monotonic() + 20
        while server.stats().prefetched < need and time.monotonic() < deadline:
            time.sleep(0.01)
        reads = store.reads(not_by=me)  # before anything is touched: the prefetch's alone
        spans = {n: (tensors.infos[n].start, tensors.infos[n].end) for n in order}
        found = difference({n: tensors[n] for n in order}, {n: want[n] for n in order})
        ahead = server.stats().faults
        tensors["layers.0.attn"].tobytes()  # not in the list: faults
        return found, reads, spans, ahead, server.stats().faults - ahead

    found, reads, spans, ahead, later = in_target(body)
    assert found == ""
    assert ahead == 0, f"{ahead} faults on the tensors prefetched"
    assert later > 0, "a tensor not in the prefetch list was there without a fault"
    for offset, length in reads:
        near = [
            n for n, (a, b) in spans.items() if a - PAGE < offset + length and offset < b + PAGE
        ]
        assert near, f"the prefetch read [{offset}, {offset + length}), in no tensor of {order}"
    for name, (start, end) in spans.items():
        covered = sum(
            min(end, o + n) - max(start, o) for o, n in reads if o < end and start < o + n
        )
        assert covered == end - start, (
            f"the prefetch read {covered} of {name}'s {end - start} bytes"
        )


def test_the_working_set_is_in_the_order_asked_and_merged_where_contiguous() -> None:
    from userfaultfd.runtime._tensor_index import TensorInfo

    f4 = np.dtype("<f4")
    a, b, c = (
        TensorInfo(n, "F32", f4, (4,), s, s + 16) for n, s in (("a", 0), ("b", 16), ("c", 64))
    )
    assert _tensors._working_set([a, b, c], "all") == [(0, 32), (64, 16)]
    assert _tensors._working_set([a, b, c], ["c", "a", "b"]) == [(64, 16), (0, 32)]
    assert _tensors._working_set([a, b, c], ["b", "a"]) == [(16, 16), (0, 16)]
    assert _tensors._working_set([a, b, c], None) == []


class _Mapped(Store):
    """A store whose bytes are "mapped" at made-up addresses: only mapped() is ever asked."""

    def __init__(self, runs: list[tuple[int, int, int]] | None, size: int) -> None:
        self._runs, self._size = runs, size

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        raise AssertionError("mapped() read the store")

    def mapped(self) -> list[tuple[int, int, int]] | None:
        return self._runs


def test_a_selection_cuts_the_wrapped_stores_mapped_runs() -> None:
    from userfaultfd.runtime._tensor_index import TensorInfo

    f4 = np.dtype("<f4")
    where = {"a": (100, 5000), "b": (5000, 9000), "c": (20000, 30000)}
    placed = [TensorInfo(n, "F32", f4, ((b - a) // 4,), a, b) for n, (a, b) in where.items()]
    a_, b_ = 0x10000, 0x50000
    inner = _Mapped([(0, 16384, a_), (16384, 8192, 0), (24576, 12288, b_)], 36864)
    selected = _tensors._Selected(inner, placed)
    assert selected.mapped() == [
        (0, 100, 0),  # before the first tensor: zeros
        (100, 8900, a_ + 100),  # a and b, which touch: one run where the file is mapped
        (9000, 15576, 0),  # the gap, and the store's own zeros under c's first bytes
        (24576, 5424, b_),  # the rest of c
        (30000, 6864, 0),  # after the last tensor
    ], "the selection's runs are not the selected bytes where mapped and zeros elsewhere"
    assert _tensors._Selected(_Mapped(None, 36864), placed).mapped() is None, (
        "a selection of a store that maps nothing claims a mapping"
    )


def test_a_selection_of_a_local_file_copies_its_pages_from_the_mapping_and_no_others(
    model: tuple[str, dict[str, bytes]],
) -> None:
    """A selection over a local file with a built-in policy: the native path answers its
    faults from the file's mapping (the Python path where it is off), and read-ahead stops
    where the selection does. (lazy_tensors' own policy, TensorChunks, is the Python path's.)"""
    path, want = model
    chosen = ["embed", "layers.1.mlp", "layers.0.norm"]

    def body() -> tuple[str, str, int, int]:
        tensors = lazy_tensors(path, include=chosen, policy=Adaptive())
        found = difference(tensors, {n: want[n] for n in chosen})
        stats = server_of(tensors["embed"]).stats()
        low = min(t.start for t in tensors.infos.values())
        pages = {
            (at - low) // PAGE
            for t in tensors.infos.values()
            for at in range(t.start, t.end, PAGE // 4)
        } | {(t.end - 1 - low) // PAGE for t in tensors.infos.values()}
        return found, stats.path, stats.bytes, len(pages) * PAGE

    found, path_taken, filled, most = in_target(body)
    assert found == ""
    expected = "native" if native_available() else "python"
    assert path_taken == expected, f"the handler took the {path_taken} path, not {expected}"
    assert 0 < filled <= most, (
        f"{filled:,} bytes filled, more than the {most:,} of the selected tensors' pages"
    )


# --- over HTTP (nginx) -------------------------------------------------------------------------


@pytest.fixture
def nginx(tmp_path: Path, model: tuple[str, dict[str, bytes]]) -> Iterator[_servers.Nginx]:
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    root = tmp_path / "root"
    root.mkdir()
    (root / "model.safetensors").write_bytes(Path(model[0]).read_bytes())
    with _servers.nginx(root, tmp_path / "prefix") as server:
        yield server


def test_over_nginx_every_tensor_with_prefetch_all(
    nginx: _servers.Nginx, model: tuple[str, dict[str, bytes]]
) -> None:
    _, want = model
    url = f"{nginx.url}/model.safetensors"

    def everything() -> str:
        return difference(lazy_tensors(url, prefetch="all"), want)

    assert in_target(everything) == ""


def _ranges(rows: list[tuple[str, int, str, int]]) -> list[tuple[int, int]]:
    """The byte ranges [first, end) of nginx's 206 answers."""
    found = []
    for _method, status, header, _sent in rows:
        assert status == 206, f"nginx answered {status} to a read ({header})"
        first, _, last = header.removeprefix("bytes=").partition("-")
        found.append((int(first), int(last) + 1))
    return found


def test_over_nginx_a_selection_moves_only_its_pages(
    nginx: _servers.Nginx, model: tuple[str, dict[str, bytes]]
) -> None:
    """include/exclude over HTTP, counted at the server: no answer reaches into the pages of a
    tensor left out, and the bytes sent are the open's first 64 KiB and the selected tensors'
    pages, no more."""
    path, want = model
    url = f"{nginx.url}/model.safetensors"
    include, exclude = ["embed", "layers.*"], ["layers.0.[am]*", "layers.1.norm"]
    chosen = ["embed", "layers.1.mlp", "layers.1.attn", "layers.0.norm"]

    def some() -> str:
        tensors = lazy_tensors(url, include=include, exclude=exclude)
        return difference(tensors, {n: want[n] for n in chosen})

    assert in_target(some) == ""
    rows = nginx.requests("model.safetensors")
    sent = sum(row[3] for row in rows)
    spans = _spans(path)
    low = min(spans[n][0] for n in chosen)
    others = {n: middle_pages(a, b, low) for n, (a, b) in spans.items() if n not in chosen}
    reads = _ranges(rows)
    assert reads[0] == (0, HEAD_BYTES), f"the open asked for {reads[0]}, not the first 64 KiB"
    for first, end in reads[1:]:
        for name, (a, b) in others.items():
            assert not (first < b and a < end), (
                f"nginx sent [{first}, {end}), inside {name}'s pages [{a}, {b}), not selected"
            )
    pages = {
        (at - low) // PAGE for n in chosen for at in (*range(*spans[n], PAGE), spans[n][1] - 1)
    }
    limit = HEAD_BYTES + len(pages) * PAGE
    assert sent <= limit, f"nginx sent {sent:,} bytes for {chosen}, more than {limit:,}"


def test_over_nginx_a_killed_handler_is_restarted_and_the_bytes_are_right(
    nginx: _servers.Nginx, model: tuple[str, dict[str, bytes]]
) -> None:
    _, want = model
    url = f"{nginx.url}/model.safetensors"

    def body() -> tuple[str, int]:
        tensors = lazy_tensors(url)
        first = tensors["embed"].tobytes()  # served by the first handler
        server = server_of(tensors["embed"])
        os.kill(server.handler_pid, signal.SIGKILL)
        rest = difference({n: a for n, a in tensors.items() if n != "embed"},
                          {n: b for n, b in want.items() if n != "embed"})  # fmt: skip
        wrong = "" if first == want["embed"] else "embed was wrong before the kill"
        return wrong or rest, server.stats().restarts

    found, restarts = in_target(body)
    assert found == ""
    assert restarts >= 1, "the handler was killed, but never restarted"


# --- S3 (moto) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, model: tuple[str, dict[str, bytes]]) -> Any:
    """moto's S3 with the model at s3://tensors/model.safetensors; yields the store options."""
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("moto")
    base = tmp_path_factory.mktemp("moto")
    with _servers.moto_server(base / "moto.log") as endpoint:
        options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
        }
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir("tensors")
        fs.pipe_file("tensors/model.safetensors", Path(model[0]).read_bytes())
        yield options


def test_over_s3_every_tensor_and_a_selection(
    s3: dict[str, Any], model: tuple[str, dict[str, bytes]]
) -> None:
    _, want = model
    chosen = ["layers.1.attn", "positions"]

    def body() -> tuple[str, str]:
        everything = FsspecStore("s3://tensors/model.safetensors", **s3)
        some = FsspecStore("s3://tensors/model.safetensors", **s3)
        every = difference(lazy_tensors(everything, prefetch="all"), want)
        return every, difference(lazy_tensors(some, include=chosen), {n: want[n] for n in chosen})

    every, selection = in_target(body)
    assert every == "", f"prefetch='all' over S3: {every}"
    assert selection == "", f"a selection over S3: {selection}"


# --- a remote file replaced while a mapping is alive ---------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_replaced_remote_file_gives_the_opened_bytes_or_sigbus(
    where: str, request: pytest.FixtureRequest, model: tuple[str, dict[str, bytes]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The file is replaced on the server (same names and shapes, other values) after the
    mapping is made: a tensor read before reads the same again, one not read yet is the opened
    version's bytes or SIGBUS (the store is pinned to the version it opened), never the new
    version's, never zeros. Single(): only touched pages are filled, so a page is left to fail."""
    path, old = model
    newer = str(tmp_path / "newer.safetensors")
    new = write_model(newer, salt=50)
    assert all(new[n] != old[n] for n in old), "the new version must differ in every tensor"
    if where == "http":
        server: _servers.Nginx = request.getfixturevalue("nginx")
        served = server.root / "model.safetensors"
        source: Any = f"{server.url}/model.safetensors"

        def replace() -> None:
            os.utime(newer, (time.time() + 100, time.time() + 100))  # another ETag for sure
            os.replace(newer, served)
    else:
        import fsspec

        options = request.getfixturevalue("s3")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.pipe_file("tensors/replaced.safetensors", Path(path).read_bytes())
        source = FsspecStore("s3://tensors/replaced.safetensors", **options)

        def replace() -> None:  # in the forked target: a client of its own (fsspec's is not
            again = fsspec.filesystem("s3", skip_instance_cache=True, **options)  # fork-safe)
            again.pipe_file("tensors/replaced.safetensors", Path(newer).read_bytes())

    order = sorted(old, key=lambda n: _spans(path)[n][0])

    def body(channel: Channel) -> None:
        tensors = lazy_tensors(source, policy=Single())
        channel.send(("before", tensors["layers.1.mlp"].tobytes()))
        replace()
        for name in ["layers.1.mlp", *order]:
            channel.send((name, np.ascontiguousarray(tensors[name]).tobytes()))
        channel.send(("done", b""))

    got: list[tuple[str, bytes]] = []
    with Target(body, timeout=60) as target:
        try:
            while True:
                got.append(target.recv(timeout=60)[0])
        except EOFError:
            pass
        status = target.wait()
    assert got[0] == ("before", old["layers.1.mlp"]), "the tensor read before the change"
    for name, data in got[1:]:
        assert name != "done", "every tensor was read after the change: nothing was refetched"
        assert data != new[name], f"{name} holds the new version's bytes"
        assert data == old[name], f"{name} holds neither version's bytes (mixed or zeros)"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
        f"a tensor not read before the change ended the program with status {status}, not"
        f" SIGBUS, after {[n for n, _ in got]}"
    )


# --- fault-around for a remote tensor ------------------------------------------------------------


def test_tensor_chunks_fill_a_faults_tensor_chunk_whichever_way_it_is_read() -> None:
    from userfaultfd.runtime._tensor_index import TensorInfo

    f4 = np.dtype("<f4")
    page = 4096
    low = 1000  # region pages start at the first tensor, wherever it lies in the file
    where = {"a": (1000, 1000 + 10 * page + 8), "b": (1000 + 10 * page + 8, 1000 + 40 * page)}
    placed = [TensorInfo(n, "F32", f4, ((b - a) // 4,), a, b) for n, (a, b) in where.items()]
    policy = _tensors.TensorChunks(placed, low, chunk_bytes=16 * page, page_size=page)
    assert policy.window(9, 40, page) == (0, 11), "a's last page: all of a (its 11 pages)"
    assert policy.window(0, 40, page) == (0, 11), "a's first page: all of a"
    assert policy.window(39, 40, page) == (26, 40), "b's last page: b's last chunk"
    assert policy.window(12, 40, page) == (10, 26), "b's first chunk, from b's first page"
    assert policy.window(45, 50, page) == (45, 46), "a page in no tensor: itself alone"


@pytest.mark.timeout(60)
def test_over_nginx_a_copied_tensor_costs_a_round_trip_not_one_a_page(tmp_path: Path) -> None:
    """np.array() of a tensor over HTTP: its chunk comes at the first fault, however the copy
    goes (glibc's large memcpy copies backwards when source and destination share their offset
    in a page: then an adaptive window, which grows going forward only, fills a page a round
    trip; going forward it grows 4x a fault: 9 faults for this 1 MiB)."""
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    root = tmp_path / "root"
    root.mkdir()
    weights = {"a": (np.arange(1, 262_145, dtype=np.float32) % 1009 + 1).reshape(256, 1024)}
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file(weights, str(root / "one.safetensors"))
    with _servers.nginx(root, tmp_path / "prefix") as server:
        url = f"{server.url}/one.safetensors"

        def body() -> tuple[bool, int]:
            tensors = lazy_tensors(url)
            copy = np.array(tensors["a"])
            return bool(np.array_equal(copy, weights["a"])), server_of(tensors["a"]).stats().faults

        right, faults = in_target(body)
        reads = server.requests("one.safetensors")
    assert right, "the tensor copied out differs from the one written"
    assert faults <= 2, f"{faults} faults to copy a 1 MiB tensor: a page a round trip"
    assert len(reads) <= 4, (
        f"{len(reads)} requests for a 1 MiB tensor (the open, then 512 KiB each)"
    )

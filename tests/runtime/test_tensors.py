"""lazy_tensors(): safetensors files written by the safetensors package (and .npz by NumPy),
compared byte for byte with safe_open; what is fetched, and when; headers refused.

Lazily filled memory is read only in forked targets with a deadline (in_target), never in the
pytest process: there, only headers are read, and errors raised before anything is mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target
from userfaultfd.runtime import _tensors, lazy_tensors, server_of
from userfaultfd.stores import FileStore, Store

np = pytest.importorskip("numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402


def in_target(body: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``body`` in a forked process (which owns the served memory); return what it returns."""

    def run(channel: Channel) -> None:
        channel.send(("result", body()))

    with Target(run, timeout=timeout) as target:
        (_tag, value), _ = target.recv(timeout=timeout)
        assert target.exit_code() == 0
        return value


def _values(count: int, seed: int) -> Any:
    """Position-dependent values, none zero (each element differs from its neighbours)."""
    return (np.arange(count, dtype=np.float64) % 997 + 1) * (seed + 1) + seed / 8


#: name -> (dtype, shape): a small model laid out like a real one; each matrix spans pages.
LAYOUT = {
    "embed": (np.float32, (300, 128)),
    "layers.0.attn": (ml_dtypes.bfloat16, (256, 200)),
    "layers.0.mlp": (np.float32, (128, 300)),
    "layers.0.norm": (np.float16, (128,)),
    "layers.1.attn": (ml_dtypes.bfloat16, (256, 200)),
    "layers.1.mlp": (np.float32, (128, 300)),
    "layers.1.norm": (np.float16, (128,)),
    "positions": (np.int64, (7, 3)),
    "scale": (ml_dtypes.float8_e4m3fn, (4096,)),
}


def _arrays() -> dict[str, Any]:
    made = {}
    for seed, (name, (dtype, shape)) in enumerate(LAYOUT.items()):
        values = _values(int(np.prod(shape)), seed)
        if dtype is ml_dtypes.float8_e4m3fn:
            values = values % 400 + 1  # float8_e4m3fn tops out at 448
        made[name] = values.astype(dtype).reshape(shape)
        assert np.all(made[name].astype(np.float64) != 0), f"{name} has a zero element"
    return made


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """A safetensors file and each tensor's bytes as safe_open gives them."""
    path = str(tmp_path_factory.mktemp("tensors") / "model.safetensors")
    arrays = _arrays()
    safetensors_numpy.save_file(arrays, path, metadata={"format": "np", "layers": "2"})
    want = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is no dict
            if name == "scale":  # safe_open(numpy) cannot make float8 (np.float8_e4m3fn)
                want[name] = arrays[name].tobytes()
            else:
                want[name] = f.get_tensor(name).tobytes()
    return path, want


def _difference(tensors: Any, want: dict[str, bytes]) -> str:
    """ "" when every tensor holds ``want``'s bytes; else the first wrong tensor and element."""
    if sorted(tensors) != sorted(want):
        return f"tensors {sorted(tensors)}, expected {sorted(want)}"
    for name, array in tensors.items():
        got = np.ascontiguousarray(array).tobytes()
        if got != want[name]:
            if len(got) != len(want[name]):
                return f"{name}: {len(got)} bytes, expected {len(want[name])}"
            at = next(i for i, (a, b) in enumerate(zip(got, want[name], strict=True)) if a != b)
            element = np.unravel_index(at // array.dtype.itemsize, array.shape)
            return f"{name}: element {tuple(map(int, element))} differs first (byte {at})"
    return ""


@pytest.mark.parametrize("direct", [None, False], ids=["default", "handler"])
def test_every_tensor_matches_safe_open(model: tuple[str, dict[str, bytes]], direct: Any) -> None:
    path, want = model

    def body() -> tuple[str, bool]:
        tensors = lazy_tensors(path, direct=direct)
        return _difference(tensors, want), all(not a.flags.writeable for a in tensors.values())

    difference, read_only = in_target(body)
    assert difference == ""
    assert read_only, "a tensor's view is writable: the mapping is read-only"


def test_the_header_alone_gives_names_dtypes_shapes_and_metadata(
    model: tuple[str, dict[str, bytes]],
) -> None:
    path, _ = model
    tensors = lazy_tensors(path)  # a local file: the kernel's mapping; nothing is touched here
    expected = {n: (np.dtype(d), s) for n, (d, s) in LAYOUT.items()}
    assert {n: (a.dtype, a.shape) for n, a in tensors.items()} == expected
    assert dict(tensors.metadata) == {"format": "np", "layers": "2"}
    starts = [tensors.infos[n].start for n in tensors]
    assert starts == sorted(starts), "the mapping is not in file order"


class LoggedStore(Store):
    """A local file whose every read is logged to ``log`` as (pid, offset, length): the
    handler reads in another process, so the log is a file."""

    def __init__(self, path: str, log: str) -> None:
        self._file = FileStore(path)
        self._path, self._log = path, log

    @property
    def size(self) -> int:
        return self._file.size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, struct.pack("<qqq", os.getpid(), offset, len(buffer)))
        finally:
            os.close(fd)
        return self._file.read_into(offset, buffer)

    def reopen(self) -> Store:
        return LoggedStore(self._path, self._log)

    def close(self) -> None:
        self._file.close()

    def reads(self, *, not_by: int) -> list[tuple[int, int]]:
        """(offset, length) of every read made by a process other than ``not_by``, in order."""
        with open(self._log, "rb") as f:
            data = f.read()
        return [(o, n) for pid, o, n in struct.iter_unpack("<qqq", data) if pid != not_by]


def _middle_pages(info: Any, low: int) -> tuple[int, int]:
    """The bytes of a tensor's pages that hold no other tensor's bytes (region pages start at
    ``low``, the first mapped tensor's offset)."""
    first = low + -(-(info.start - low) // PAGE) * PAGE
    last = low + (info.end - low) // PAGE * PAGE
    return first, last


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
        difference = _difference(tensors, {n: want[n] for n in chosen})
        low = min(i.start for i in tensors.infos.values())
        everything = lazy_tensors(path)  # the header alone: where the others lie
        others = {n: _middle_pages(everything.infos[n], low) for n in want if n not in chosen}
        filled = server_of(tensors["embed"]).stats().bytes
        return difference, store.reads(not_by=me), others, filled

    difference, reads, others, filled = in_target(body)
    assert difference == ""
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
        difference = _difference(tensors, want)
        return difference, prefetched - pages, server.stats().faults

    difference, missing, faults = in_target(body)
    assert missing == 0, f"the prefetch left {-missing} pages out"
    assert difference == ""
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
        difference = _difference({n: tensors[n] for n in order}, {n: want[n] for n in order})
        ahead = server.stats().faults
        tensors["layers.0.attn"].tobytes()  # not in the list: faults
        return difference, reads, spans, ahead, server.stats().faults - ahead

    difference, reads, spans, ahead, later = in_target(body)
    assert difference == ""
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


def _safetensors(header: dict[str, Any] | bytes, data: bytes = b"\x01" * 64) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


_F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
BAD = {
    "header over 100 MB": (struct.pack("<Q", 200_000_000) + b"{" + b" " * 64, "100,000,000"),
    "bad JSON": (_safetensors(b'{"a": {"dtype": '), "not JSON"),
    "unknown dtype": (_safetensors({"a": {**_F32, "dtype": "Q7"}}), "unknown dtype 'Q7'"),
    "overlap": (_safetensors({"a": _F32, "b": {**_F32, "data_offsets": [8, 24]}}),
                "'a' and 'b' overlap"),
    "out of range": (_safetensors({"a": {**_F32, "data_offsets": [60, 76]}}),
                     "past the end of the data"),
    "size against shape": (_safetensors({"a": {**_F32, "shape": [5]}}), "needs 20"),
    "header past the file": (struct.pack("<Q", 4096) + b"{}", "the file has 2"),
    "neither format": (b"GGUF" + bytes(range(1, 60)), "neither safetensors"),
    "metadata not strings": (_safetensors({"__metadata__": {"n": 1}, "a": _F32}),
                             "__metadata__ must map strings"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_header_is_one_clear_error_and_nothing_is_mapped(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    mapped: list[str] = []
    monkeypatch.setattr(_tensors, "_map", lambda *a, **k: mapped.append("mapped"))
    with pytest.raises(ValueError, match=message) as caught:
        lazy_tensors(str(path))
    assert str(path) in str(caught.value), "the error does not name the file"
    assert mapped == [], f"{case}: memory was mapped before the header was refused"


def test_bfloat16_without_ml_dtypes_says_what_to_install(
    model: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = model
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    with pytest.raises(ImportError, match=r"BF16.*pip install ml-dtypes"):
        lazy_tensors(path)


def test_selection_and_prefetch_errors_name_what_is_wrong(
    model: tuple[str, dict[str, bytes]],
) -> None:
    path, _ = model
    with pytest.raises(ValueError, match=r"include 'layer\.\*' matches no tensor"):
        lazy_tensors(path, include="layer.*")
    with pytest.raises(ValueError, match="leave no tensor"):
        lazy_tensors(path, exclude="*")
    with pytest.raises(ValueError, match=r"prefetch names \['embed'\], not among"):
        lazy_tensors(path, exclude="embed", prefetch=["embed"])
    with pytest.raises(ValueError, match='prefetch must be None, "all" or a list'):
        lazy_tensors(path, prefetch="embed")
    with pytest.raises(TypeError, match="no budget= yet"):
        lazy_tensors(path, budget=1 << 30)
    with pytest.raises(ValueError, match="direct=True cannot leave tensors out"):
        lazy_tensors(path, include="embed", direct=True)


def test_a_forked_child_reads_a_tensor(model: tuple[str, dict[str, bytes]]) -> None:
    path, want = model

    def body() -> tuple[str, int]:
        tensors = lazy_tensors(path, direct=False)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # touches the memory first: the handler serves the child's copy
            os.write(write, _digest(tensors["layers.1.mlp"]).encode())
            os._exit(0)
        os.close(write)
        got = os.read(read, 64).decode()
        _, status = os.waitpid(child, 0)
        expected = hashlib.sha256(want["layers.1.mlp"]).hexdigest()
        return ("" if got == expected else f"the child read {got}, not {expected}"), status

    difference, status = in_target(body)
    assert status == 0, f"the child ended with status {status}"
    assert difference == ""


def _digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_a_killed_handler_is_restarted_and_the_bytes_are_right(
    model: tuple[str, dict[str, bytes]],
) -> None:
    path, want = model

    def body() -> tuple[str, int]:
        tensors = lazy_tensors(path, direct=False)
        first = tensors["embed"].tobytes()  # served by the first handler
        server = server_of(tensors["embed"])
        os.kill(server.handler_pid, signal.SIGKILL)
        rest = _difference({n: a for n, a in tensors.items() if n != "embed"},
                           {n: b for n, b in want.items() if n != "embed"})  # fmt: skip
        wrong = "" if first == want["embed"] else "embed was wrong before the kill"
        return wrong or rest, server.stats().restarts

    difference, restarts = in_target(body)
    assert difference == ""
    assert restarts >= 1, "the handler was killed, but never restarted"


def test_npz_of_stored_members_and_a_compressed_one_refused(tmp_path: Path) -> None:
    arrays = {"a": np.arange(1, 50_001, dtype=np.int32), "b": _values(3000, 3).reshape(30, 100),
              "f": np.asfortranarray(np.arange(1, 13, dtype=np.int16).reshape(3, 4))}  # fmt: skip
    path = str(tmp_path / "arrays.npz")
    np.savez(path, **arrays)

    def body() -> str:
        tensors = lazy_tensors(path, direct=False)
        want = {n: np.ascontiguousarray(a).tobytes() for n, a in arrays.items()}
        return _difference(tensors, want)

    assert in_target(body) == ""
    np.savez_compressed(tmp_path / "small.npz", **arrays)
    with pytest.raises(ValueError, match=r"member 'a\.npy' is compressed"):
        lazy_tensors(str(tmp_path / "small.npz"))


@pytest.fixture
def nginx(tmp_path: Path, model: tuple[str, dict[str, bytes]]) -> Any:
    from tests.stores import _servers

    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    root = tmp_path / "root"
    root.mkdir()
    (root / "model.safetensors").write_bytes(Path(model[0]).read_bytes())
    with _servers.nginx(root, tmp_path / "prefix") as server:
        yield server


def test_over_nginx_every_tensor_and_a_selection(
    nginx: Any, model: tuple[str, dict[str, bytes]]
) -> None:
    _, want = model
    url = f"{nginx.url}/model.safetensors"

    def everything() -> str:
        return _difference(lazy_tensors(url, prefetch="all"), want)

    assert in_target(everything) == ""
    before = sum(sent for *_, sent in nginx.requests("model.safetensors"))
    chosen = ["positions", "layers.0.norm"]

    def some() -> str:
        return _difference(lazy_tensors(url, include=chosen), {n: want[n] for n in chosen})

    assert in_target(some) == ""
    moved = sum(sent for *_, sent in nginx.requests("model.safetensors")) - before
    # The header's speculative read (64 KiB) and a page or two around each small tensor.
    limit = (64 << 10) + 2 * len(chosen) * PAGE + sum(len(want[n]) for n in chosen)
    assert moved <= limit, f"{moved:,} bytes moved for {chosen}, more than {limit:,}"


@pytest.mark.timeout(120)
def test_uffd_lazy_tensors_lists_from_the_header_and_touches(
    model: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    path, want = model
    argv = [sys.executable, "-m", "userfaultfd", "lazy-tensors", path, "--include", "layers.1.*"]
    listed = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1] for line in listed.stdout.splitlines() if line.startswith("│")}
    assert rows == {"layers.1.mlp", "layers.1.attn", "layers.1.norm", "total"}, listed.stdout
    chosen = sum(len(b) for n, b in want.items() if n.startswith("layers.1."))
    touched = subprocess.run([*argv, "--touch", "--prefetch", "all"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert touched.returncode == 0, touched.stderr
    assert f"read {chosen:,} bytes of 3 tensors" in touched.stdout, touched.stdout
    assert "the handler filled" in touched.stdout, touched.stdout
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(range(1, 60)))
    refused = subprocess.run([*argv[:4], str(bad)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "neither safetensors" in refused.stderr, refused.stderr

"""lazy_tensors(): what the mapping gives. Safetensors files written by the safetensors package
(and .npz by NumPy) compared byte for byte with safe_open; names, dtypes, shapes and metadata from
the header alone; bad headers refused before anything is mapped; a forked child and a killed
handler; the command line. What is fetched, and from where (selections, prefetch, HTTP, S3, a
changed remote version): test_tensors_fetch.py.

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
from pathlib import Path
from typing import Any

import pytest

from tests.runtime._tensor_files import (
    LAYOUT,
    difference,
    digest,
    in_target,
    values,
    write_model,
)
from userfaultfd.runtime import _tensors, lazy_tensors, server_of

np = pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """A safetensors file and each tensor's bytes as safe_open gives them."""
    path = str(tmp_path_factory.mktemp("tensors") / "model.safetensors")
    return path, write_model(path)


@pytest.mark.parametrize("direct", [None, False], ids=["default", "handler"])
def test_every_tensor_matches_safe_open(model: tuple[str, dict[str, bytes]], direct: Any) -> None:
    path, want = model

    def body() -> tuple[str, bool]:
        tensors = lazy_tensors(path, direct=direct)
        return difference(tensors, want), all(not a.flags.writeable for a in tensors.values())

    found, read_only = in_target(body)
    assert found == ""
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
    with pytest.raises(ValueError, match="prefetch= reads the tensors in whole, past any budget"):
        lazy_tensors(path, budget=1 << 30, prefetch="all")
    with pytest.raises(ValueError, match="keeps no budget"):
        lazy_tensors(path, budget="1G", direct=True)
    with pytest.raises(ValueError, match="is not a size"):
        lazy_tensors(path, budget="lots")
    with pytest.raises(ValueError, match="direct=True cannot leave tensors out"):
        lazy_tensors(path, include="embed", direct=True)


def test_a_forked_child_reads_a_tensor(model: tuple[str, dict[str, bytes]]) -> None:
    path, want = model

    def body() -> tuple[str, int]:
        tensors = lazy_tensors(path, direct=False)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # touches the memory first: the handler serves the child's copy
            os.write(write, digest(tensors["layers.1.mlp"]).encode())
            os._exit(0)
        os.close(write)
        got = os.read(read, 64).decode()
        _, status = os.waitpid(child, 0)
        expected = hashlib.sha256(want["layers.1.mlp"]).hexdigest()
        return ("" if got == expected else f"the child read {got}, not {expected}"), status

    found, status = in_target(body)
    assert status == 0, f"the child ended with status {status}"
    assert found == ""


def test_a_killed_handler_is_restarted_and_the_bytes_are_right(
    model: tuple[str, dict[str, bytes]],
) -> None:
    path, want = model

    def body() -> tuple[str, int]:
        tensors = lazy_tensors(path, direct=False)
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


def test_npz_of_stored_members_and_a_compressed_one_refused(tmp_path: Path) -> None:
    arrays = {"a": np.arange(1, 50_001, dtype=np.int32), "b": values(3000, 3).reshape(30, 100),
              "f": np.asfortranarray(np.arange(1, 13, dtype=np.int16).reshape(3, 4))}  # fmt: skip
    path = str(tmp_path / "arrays.npz")
    np.savez(path, **arrays)

    def body() -> str:
        tensors = lazy_tensors(path, direct=False)
        want = {n: np.ascontiguousarray(a).tobytes() for n, a in arrays.items()}
        return difference(tensors, want)

    assert in_target(body) == ""
    np.savez_compressed(tmp_path / "small.npz", **arrays)
    with pytest.raises(ValueError, match=r"member 'a\.npy' is compressed"):
        lazy_tensors(str(tmp_path / "small.npz"))


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

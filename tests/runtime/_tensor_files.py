"""What the lazy_tensors tests share: a small model written by the safetensors package, the
bytes safe_open gives for each tensor, a comparison that names the first wrong element, and a
forked target to read lazily filled memory in (never the pytest process)."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target
from userfaultfd.stores import FileStore, Store

np = pytest.importorskip("numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

__all__ = [
    "LAYOUT",
    "LoggedStore",
    "difference",
    "digest",
    "in_target",
    "middle_pages",
    "values",
    "write_model",
]


def in_target(body: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``body`` in a forked process (which owns the served memory); return what it returns."""

    def run(channel: Channel) -> None:
        channel.send(("result", body()))

    with Target(run, timeout=timeout) as target:
        (_tag, value), _ = target.recv(timeout=timeout)
        assert target.exit_code() == 0
        return value


def values(count: int, seed: int) -> Any:
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


def _arrays(salt: int = 0) -> dict[str, Any]:
    made = {}
    for seed, (name, (dtype, shape)) in enumerate(LAYOUT.items()):
        numbers = values(int(np.prod(shape)), seed + salt)
        if dtype is ml_dtypes.float8_e4m3fn:
            numbers = numbers % 400 + 1  # float8_e4m3fn tops out at 448
        made[name] = numbers.astype(dtype).reshape(shape)
        assert np.all(made[name].astype(np.float64) != 0), f"{name} has a zero element"
    return made


def write_model(path: str, salt: int = 0) -> dict[str, bytes]:
    """Write the model to ``path`` (``salt``: other values, the same layout: another version);
    each tensor's bytes as safe_open gives them."""
    arrays = _arrays(salt)
    safetensors_numpy.save_file(arrays, path, metadata={"format": "np", "layers": "2"})
    want = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is no dict
            if name == "scale":  # safe_open(numpy) cannot make float8 (np.float8_e4m3fn)
                want[name] = arrays[name].tobytes()
            else:
                want[name] = f.get_tensor(name).tobytes()
    return want


def difference(tensors: Any, want: dict[str, bytes]) -> str:
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


def digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class LoggedStore(Store):
    """A local file whose every read is logged to ``log`` as (pid, offset, length): the
    handler reads in another process, so the log is a file."""

    def __init__(self, path: str | Path, log: str | Path) -> None:
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


def middle_pages(start: int, end: int, low: int) -> tuple[int, int]:
    """The bytes of the pages of a tensor at [start, end) that hold no other tensor's bytes
    (region pages start at ``low``, the first mapped tensor's offset)."""
    first = low + -(-(start - low) // PAGE) * PAGE
    last = low + (end - low) // PAGE * PAGE
    return first, last

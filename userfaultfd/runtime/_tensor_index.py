"""The index of a file of named arrays: where each tensor's bytes lie, read from its header alone.

Two formats. safetensors: an 8-byte little-endian header length N, N bytes of JSON (each tensor's
dtype, shape and ``data_offsets`` relative to the data that follows; ``__metadata__``), then the
data. ``.npz``: a zip of ``.npy`` members; only stored (uncompressed) members lie in the file as
they are in memory, and the zip's central directory says where (a member's local header offset
plus the local header's length, then the .npy header).

Everything is checked before anything is mapped: a header over 100 MB, bad JSON, an unknown
dtype, a tensor whose bytes do not match its shape, lie past the end of the file or overlap
another's are each one ValueError naming the tensor and what is wrong. A safetensors header is
read in at most two reads of the store: one speculative read from the start, and the rest of
the header if it is longer.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Literal, final

from ..stores import Store

__all__ = ["MAX_HEADER", "Index", "TensorInfo", "read_index"]

#: The largest safetensors header taken (the format's own reference refuses larger ones too).
MAX_HEADER = 100_000_000
#: The first, speculative read: the length, and the whole header of most files.
_PROBE = 64 << 10
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length

#: safetensors dtypes NumPy has: their NumPy names (always little-endian).
_NUMPY_DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2",
    "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
    "C64": "<c8",
}  # fmt: skip
#: safetensors dtypes only ml_dtypes gives NumPy (what JAX uses).
_ML_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


@final
@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: its name, dtype (the format's name, and NumPy's), shape, and its bytes
    [start, end) as offsets in the file."""

    name: str
    dtype_name: str
    dtype: Any
    shape: tuple[int, ...]
    start: int
    end: int
    #: A .npz member saved in Fortran order (its view is transposed).
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@final
@dataclass(frozen=True, slots=True)
class Index:
    """What a file's header says: its format, its tensors in file order, its metadata."""

    format: Literal["safetensors", "npz"]
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    #: Bytes of header read to make this index (what was moved before any tensor).
    header_bytes: int


def read_index(store: Store, name: str = "the source") -> Index:
    """The index of ``store`` (a safetensors file or an .npz of stored members), checked.
    ValueError names ``name``, the tensor and what is wrong; nothing else is read."""
    size = store.size
    probe = bytearray(min(size, _PROBE))
    got = store.read_into(0, memoryview(probe))
    head = bytes(probe[:got])
    if head.startswith(_ZIP_MAGIC):
        return _npz_index(store, name)
    if head.startswith(_NPY_MAGIC):
        raise ValueError(f"{name} is a .npy file (one array): lazy() maps it")
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{name} is neither safetensors (an 8-byte length, then a JSON header)"
                         f" nor .npz (a zip): it starts with {head[:16]!r}")  # fmt: skip
    (length,) = struct.unpack_from("<Q", head)
    if length > MAX_HEADER:
        raise ValueError(f"{name}: a safetensors header of {length:,} bytes is over the"
                         f" {MAX_HEADER:,}-byte limit")  # fmt: skip
    if 8 + length > size:
        raise ValueError(f"{name}: the safetensors header says {length:,} bytes, but the file has"
                         f" {size - 8:,} after its length")  # fmt: skip
    text = head[8 : 8 + length]
    if len(text) < length:  # the second read: the rest of a long header
        rest = bytearray(length - len(text))
        store.read_into(8 + len(text), memoryview(rest))
        text += bytes(rest)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: the safetensors header is a JSON {type(header).__name__},"
                         " not an object")  # fmt: skip
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):  # fmt: skip
        raise ValueError(f"{name}: __metadata__ must map strings to strings, not {metadata!r}")
    base = 8 + length
    tensors = [_safetensor(key, entry, base, size, name) for key, entry in header.items()]
    return Index("safetensors", _checked(tensors, name), metadata, base)


def _safetensor(key: str, entry: Any, base: int, size: int, name: str) -> TensorInfo:
    where = f"{name}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: its entry is {entry!r}, not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets))
        or offsets[0] > offsets[1]
    ):  # fmt: skip
        raise ValueError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
    dtype = numpy_dtype(dtype_name, where)
    begin, end = base + offsets[0], base + offsets[1]
    if end > size:
        raise ValueError(f"{where}: its bytes [{offsets[0]}, {offsets[1]}) lie past the end of"
                         f" the data ({size - base:,} bytes)")  # fmt: skip
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want:
        raise ValueError(f"{where}: {offsets[1] - offsets[0]:,} bytes for shape {shape} of"
                         f" {dtype_name}, which needs {want:,}")  # fmt: skip
    return TensorInfo(key, str(dtype_name), dtype, tuple(shape), begin, end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def numpy_dtype(dtype_name: object, where: str) -> Any:
    """NumPy's dtype for a safetensors dtype name; ValueError (ImportError for a dtype that
    needs ml_dtypes, when it is missing) saying what is wrong."""
    import numpy as np

    if isinstance(dtype_name, str) and dtype_name in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[dtype_name])
    if isinstance(dtype_name, str) and dtype_name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(f"{where} is {dtype_name}, which NumPy has only through ml_dtypes:"
                              " pip install ml-dtypes") from None  # fmt: skip
        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[dtype_name]))
    known = ", ".join([*_NUMPY_DTYPES, *_ML_DTYPES])
    raise ValueError(f"{where}: unknown dtype {dtype_name!r} (known: {known})")


def _checked(tensors: list[TensorInfo], name: str) -> tuple[TensorInfo, ...]:
    """``tensors`` in file order, once no two of them share a byte."""
    ordered = sorted(tensors, key=lambda t: (t.start, t.end))
    placed = [t for t in ordered if t.nbytes]
    for before, after in itertools.pairwise(placed):
        if after.start < before.end:
            raise ValueError(f"{name}: tensors {before.name!r} and {after.name!r} overlap (bytes"
                             f" [{before.start}, {before.end}) and [{after.start}, {after.end}) of"
                             " the file)")  # fmt: skip
    return tuple(ordered)


# -- .npz ----------------------------------------------------------------------------------------


class _StoreFile(io.RawIOBase):
    """A store as a read-only, seekable file, for zipfile to read the central directory from."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._position = 0
        self.moved = 0  # bytes read

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._store.size}
        self._position = base[whence] + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        got = self._store.read_into(self._position, memoryview(buffer).cast("B"))
        self._position += got
        self.moved += got
        return got


def _npz_index(store: Store, name: str) -> Index:
    raw = _StoreFile(store)
    try:
        archive = zipfile.ZipFile(io.BufferedReader(raw, 64 << 10))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{name}: not a readable .npz ({err})") from None
    tensors = []
    moved = raw.moved
    for member in archive.infolist():
        where = f"{name}: member {member.filename!r}"
        if member.flag_bits & 1:
            raise ValueError(f"{where} is encrypted")
        if member.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{where} is compressed (np.savez_compressed): only stored members"
                             " (np.savez) lie in the file as arrays")  # fmt: skip
        # The local header's name and extra field may differ from the central directory's.
        head = _read(store, member.header_offset, 4096)
        moved += len(head)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _ZIP_MAGIC:
            raise ValueError(f"{where}: no local header at offset {member.header_offset}")
        _sig, name_length, extra_length = _LOCAL_HEADER.unpack_from(head)
        data = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        end = data + member.file_size
        if end > store.size:
            raise ValueError(f"{where}: its bytes lie past the end of the file")
        npy = head[data - member.header_offset :]
        try:
            shape, fortran, dtype, length = _npy_header(npy)
        except ValueError:
            if len(head) < 4096:
                raise ValueError(f"{where}: not a .npy array") from None
            npy = _read(store, data, min(end - data, MAX_HEADER))  # a long .npy header
            moved += len(npy)
            try:
                shape, fortran, dtype, length = _npy_header(npy)
            except ValueError as err:
                raise ValueError(f"{where}: not a .npy array ({err})") from None
        if dtype.hasobject:
            raise ValueError(f"{where} holds Python objects, which cannot be mapped")
        start = data + length
        want = math.prod(shape) * dtype.itemsize
        if start + want > end:
            raise ValueError(f"{where}: {end - start:,} bytes for shape {shape} of {dtype},"
                             f" which needs {want:,}")  # fmt: skip
        key = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
        tensors.append(TensorInfo(key, dtype.str, dtype, tuple(shape), start, start + want,
                                  fortran=bool(fortran)))  # fmt: skip
    return Index("npz", _checked(tensors, name), {}, moved)


def _read(store: Store, offset: int, length: int) -> bytes:
    buffer = bytearray(max(0, min(length, store.size - offset)))
    got = store.read_into(offset, memoryview(buffer))
    return bytes(buffer[:got])


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, Any, int]:
    """(shape, Fortran order, dtype, header length) of the .npy that ``data`` starts with;
    ValueError if it does not start with a whole .npy header."""
    import numpy as np

    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)  # fmt: skip
    shape, fortran, dtype = read(stream)
    return tuple(shape), bool(fortran), dtype, stream.tell()

"""The index of a content-addressed pack (see _chunked.py): its format, read and written.

Index format, version 2 (all integers little-endian)::

    header   44 bytes   magic b"UFFDCIX1", u16 version (2), u16 flags (0), u32 chunk size,
                        u64 uncompressed size, u32 page size, u32 bundle count, u32 frame count,
                        u32 length of the bundle prefix, u32 length of the compressed body
    body                one zstd frame of, in order: the bundle prefix relative to the index
                        (UTF-8, "bundles/"); per bundle its blake2b-256 (its name in hex); the
                        frame table in columns: u32 bundle number, u64 offset in the bundle,
                        u32 compressed length, u32 uncompressed length, blake2b-128 of the
                        uncompressed frame; the page table in columns: u8 1 for a zero page (no
                        frame), i32 frame number of the page minus that of the page before it
                        (0 for a zero page), u32 slot (the page is bytes [slot * page size, ..)
                        of its frame)
    trailer  24 bytes   blake2b-128 of everything before it, magic b"UFFDCEND"

The columns compress: a 256 MiB image's index is 40 kB (its first manifest 1 MB, fetched by
writers only).

Index format, version 1 (no longer written; read): a 36-byte header as above to the u64 size,
then u64 chunk count and u32 prefix length, the prefix ("chunks/"), per chunk u32 object length
(0: a zero chunk) and the blake2b-256 of the chunk, which names its object (one zstd frame of the
chunk), and the same trailer. The reader takes it as a version 2 index whose pages are chunks,
each frame alone in its object.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import struct
import sys
from array import array
from collections.abc import Iterable

import zstandard

from .._location import is_url, local_path
from ._base import StoreError
from ._chunks import MAX_CHUNK_SIZE, digest

__all__ = ["INDEX_MAGIC", "Frame", "Index", "index_bytes", "parse_index", "split_location"]

INDEX_MAGIC = b"UFFDCIX1"
_END_MAGIC = b"UFFDCEND"
_HEADER_V1 = struct.Struct("<8sHHIQQI")
_ENTRY_V1 = struct.Struct("<I32s")
_HEADER = struct.Struct("<8sHHIQIIIII")
TRAILER = struct.Struct("<16s8s")  # the index's and a bundle manifest's
NAME_SIZE = 32  # blake2b-256 names bundles (and version 1's chunk objects)
HASH_SIZE = 16  # blake2b-128 identifies a page and checks a frame
PREFIX = "bundles/"
_ZERO_FRAME = 0  # the page table's frame delta for a zero page
# A frame that does not shrink grows by zstd's block headers: bound what a reader believes.
MAX_FRAME = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + 1024

assert _HEADER_V1.size == 36 and _ENTRY_V1.size == 36 and TRAILER.size == 24 and _HEADER.size == 44
for _code, _width in (("I", 4), ("i", 4), ("Q", 8)):
    assert array(_code).itemsize == _width, f"array({_code!r}) is not {_width} bytes here"


def split_location(dest: str) -> tuple[str, str]:
    """(directory or prefix, name) of a path or URL: an index's bundle prefix is relative to the
    first."""
    if is_url(dest):
        parent, _, name = dest.rpartition("/")
        return parent, name
    dest = os.path.abspath(local_path(dest))
    return os.path.dirname(dest), os.path.basename(dest)


def _column(code: str, values: Iterable[int]) -> bytes:
    column = array(code, values)
    if column.itemsize > 1 and sys.byteorder != "little":
        column.byteswap()
    return column.tobytes()


def _read_column(code: str, data: bytes | memoryview) -> array[int]:
    column = array(code)
    column.frombytes(data)
    if column.itemsize > 1 and sys.byteorder != "little":
        column.byteswap()
    return column


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    """A frame in a bundle: ``bundle`` numbers the writer's list of bundle names."""

    bundle: int
    offset: int
    length: int
    raw: int
    hashed: bytes


def index_bytes(
    size: int,
    chunk_size: int,
    page_size: int,
    names: list[str],
    frames: dict[Frame, int],
    page_frame: array[int],
    page_slot: array[int],
    zero_pages: bytearray,
) -> bytes:
    """A version 2 index (see the module docstring)."""
    bundles: dict[int, int] = {}  # writer's bundle number -> this index's
    for frame in frames:
        bundles.setdefault(frame.bundle, len(bundles))
    prefix = PREFIX.encode()
    previous = 0
    deltas = array("i")
    for number, zero in zip(page_frame, zero_pages, strict=True):
        if zero:
            deltas.append(_ZERO_FRAME)
        else:
            deltas.append(number - previous)
            previous = number
    body = b"".join([
        prefix,
        b"".join(bytes.fromhex(names[b]) for b in bundles),
        _column("I", (bundles[f.bundle] for f in frames)),
        _column("Q", (f.offset for f in frames)),
        _column("I", (f.length for f in frames)),
        _column("I", (f.raw for f in frames)),
        b"".join(f.hashed for f in frames),
        bytes(zero_pages),
        _column("i", deltas),
        _column("I", page_slot),
    ])  # fmt: skip
    packed = zstandard.ZstdCompressor(level=19).compress(body)
    header = _HEADER.pack(INDEX_MAGIC, 2, 0, chunk_size, size, page_size, len(bundles),
                          len(frames), len(prefix), len(packed))  # fmt: skip
    out = header + packed
    return out + TRAILER.pack(digest(out, 16), _END_MAGIC)


@dataclasses.dataclass(frozen=True, slots=True)
class Index:
    version: int
    size: int
    chunk_size: int
    page_size: int  # version 1: the chunk size
    prefix: str
    names: tuple[str, ...]  # the objects frames are in, by number
    frame_object: array[int]
    frame_offset: array[int]
    frame_length: array[int]
    frame_raw: array[int]
    frame_hash: tuple[bytes, ...]
    page_frame: array[int]  # of a zero page: meaningless
    page_slot: array[int]
    zero: bytes  # per page: 1 for a zero page

    @property
    def pages(self) -> int:
        return len(self.zero)


def _check_trailer(data: bytes) -> None:
    check, end_magic = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if end_magic != _END_MAGIC or digest(data[: -TRAILER.size], 16) != check:
        raise StoreError(errno.EIO, "corrupt pack index: it does not match its trailer's digest")


def _check_prefix(raw: bytes) -> str:
    try:
        prefix = raw.decode()
    except UnicodeDecodeError as err:
        raise StoreError(errno.EIO, f"corrupt pack index: bundle prefix: {err}") from err
    if prefix.startswith("/") or "://" in prefix or ".." in prefix.split("/"):
        raise StoreError(errno.EIO, f"pack index: prefix {prefix!r} leaves the index's directory")
    return prefix


def parse_index(data: bytes) -> Index:
    if len(data) < _HEADER_V1.size + TRAILER.size:
        raise StoreError(errno.EIO, f"not a complete pack index: {len(data)} bytes")
    magic, version, flags = struct.unpack_from("<8sHH", data)
    if magic != INDEX_MAGIC:
        raise StoreError(
            errno.EIO, f"not a uffd pack index: magic {magic[:8]!r}, expected {INDEX_MAGIC!r}"
        )
    if version not in (1, 2) or flags != 0:
        raise StoreError(
            errno.EIO, f"pack index version {version} flags {flags:#x} are not supported"
        )
    return _parse_v1(data) if version == 1 else _parse_v2(data)


def _parse_v2(data: bytes) -> Index:
    if len(data) < _HEADER.size + TRAILER.size:
        raise StoreError(errno.EIO, f"not a complete pack index: {len(data)} bytes")
    (_, _, _, chunk_size, size, page_size, bundles, frames, prefix_length,
     packed_length) = _HEADER.unpack_from(data)  # fmt: skip
    if len(data) != _HEADER.size + packed_length + TRAILER.size:
        raise StoreError(
            errno.EIO,
            f"not a complete pack index: {len(data)} bytes, its header says "
            f"{_HEADER.size + packed_length + TRAILER.size}",
        )
    _check_trailer(data)
    if not 0 < page_size <= MAX_CHUNK_SIZE or chunk_size == 0:
        raise StoreError(
            errno.EIO, f"corrupt pack index: pages of {page_size}, chunks of {chunk_size}"
        )
    pages = -(-size // page_size)
    lengths = [prefix_length, bundles * NAME_SIZE, frames * 4, frames * 8, frames * 4,
               frames * 4, frames * HASH_SIZE, pages, pages * 4, pages * 4]  # fmt: skip
    expected = sum(lengths)
    try:
        body = zstandard.ZstdDecompressor().decompress(
            data[_HEADER.size : _HEADER.size + packed_length], max_output_size=expected
        )
    except zstandard.ZstdError as err:
        raise StoreError(errno.EIO, f"corrupt pack index: its body: {err}") from err
    if len(body) != expected:
        raise StoreError(
            errno.EIO, f"corrupt pack index: a body of {len(body)} bytes, not {expected}"
        )
    view = memoryview(body)
    parts = []
    at = 0
    for n in lengths:
        parts.append(view[at : at + n])
        at += n
    prefix = _check_prefix(bytes(parts[0]))
    names = tuple(bytes(parts[1][k : k + NAME_SIZE]).hex() for k in range(0, len(parts[1]),
                                                                          NAME_SIZE))  # fmt: skip
    frame_object, frame_offset = _read_column("I", parts[2]), _read_column("Q", parts[3])
    frame_length, frame_raw = _read_column("I", parts[4]), _read_column("I", parts[5])
    hashes = bytes(parts[6])
    frame_hash = tuple(hashes[k : k + HASH_SIZE] for k in range(0, len(hashes), HASH_SIZE))
    zero = bytes(parts[7])
    page_frame = array("q", itertools.accumulate(_read_column("i", parts[8])))
    page_slot = _read_column("I", parts[9])
    if frames and (max(frame_object) >= bundles or max(frame_raw) > MAX_CHUNK_SIZE
                   or min(frame_raw) == 0 or min(frame_length) == 0
                   or max(frame_length) > MAX_FRAME):  # fmt: skip
        raise StoreError(
            errno.EIO, "corrupt pack index: a frame outside its bundles, or of a bad size"
        )
    if zero.count(0) and (min(page_frame) < 0 or max(page_frame) >= frames):
        raise StoreError(
            errno.EIO, f"corrupt pack index: a page names a frame past the last ({frames})"
        )
    if zero.translate(None, b"\0\1"):
        raise StoreError(errno.EIO, "corrupt pack index: a zero-page flag other than 0 or 1")
    return Index(2, size, chunk_size, page_size, prefix, names, frame_object, frame_offset,
                  frame_length, frame_raw, frame_hash, page_frame, page_slot, zero)  # fmt: skip


def _parse_v1(data: bytes) -> Index:
    _, _, _, chunk_size, size, count, prefix_length = _HEADER_V1.unpack_from(data)
    entries_at = _HEADER_V1.size + prefix_length
    if len(data) != entries_at + count * _ENTRY_V1.size + TRAILER.size:
        raise StoreError(
            errno.EIO, f"not a complete pack index: {len(data)} bytes for {count} chunks"
        )
    _check_trailer(data)
    if chunk_size == 0 or count != -(-size // chunk_size):
        raise StoreError(
            errno.EIO, f"corrupt pack index: {count} chunks of {chunk_size} for {size} bytes"
        )
    prefix = _check_prefix(data[_HEADER_V1.size : entries_at])
    objects: dict[bytes, int] = {}
    lengths, raws, hashes = array("I"), array("I"), []
    page_frame, zero = array("q"), bytearray(count)
    zero_digests: dict[int, bytes] = {}
    for i, (length, hashed) in enumerate(_ENTRY_V1.iter_unpack(data[entries_at : -TRAILER.size])):
        n = min(chunk_size, size - i * chunk_size)
        if length == 0:
            if n not in zero_digests:
                zero_digests[n] = digest(bytes(n), NAME_SIZE)
            if hashed != zero_digests[n]:
                raise StoreError(errno.EIO, f"corrupt pack index: chunk {i} has no object")
            zero[i] = 1
            page_frame.append(0)
            continue
        number = objects.setdefault(hashed, len(objects))
        if number == len(lengths):
            lengths.append(length)
            raws.append(n)
            hashes.append(hashed)
        elif (lengths[number], raws[number]) != (length, n):
            raise StoreError(errno.EIO, f"corrupt pack index: chunk {i}'s object has two sizes")
        page_frame.append(number)
    frames = len(lengths)
    return Index(1, size, chunk_size, chunk_size, prefix, tuple(h.hex() for h in objects),
                  array("I", range(frames)), array("Q", bytes(8 * frames)), lengths, raws,
                  tuple(hashes), page_frame, array("I", bytes(4 * count)), bytes(zero))  # fmt: skip

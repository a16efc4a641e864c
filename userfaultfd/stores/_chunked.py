"""A content-addressed pack: pages shared between packs, compressed and fetched a chunk at a time.

Layout: ``pack(source, "DIR/NAME.index", layout="chunks")`` writes bundles of new pages into
``DIR/bundles/`` and then ``DIR/NAME.index``; DIR is a local directory or an fsspec prefix
(s3://bucket/images, memory://...). Packs written into the same DIR share their pages, so a new
version of an image uploads only the pages that changed (``PackInfo.unique_bytes``), however
scattered, and a reader's :class:`ChunkCache` keeps a frame once for every pack that has it.

Granularity. Deduplication is per page (4 KiB, or the whole chunk when the chunk size is not a
multiple of 4 KiB): a page that a pack in DIR already stored is not stored again. Compression and
fetching are per chunk: the new pages of each chunk-sized group of the source are compressed
together, as one zstd frame, so a first pack compresses as well as whole chunks do (pages alone
compress 8% worse on the benchmarks' data), and a reader fetches a page's whole frame, at most a
chunk, in one ranged GET. Frames follow each other in bundles (objects of about 4 MiB, named by
their blake2b-256), and frames a read needs that lie next to each other in a bundle come in one
GET. A group with one changed page is then served from two frames: the old one (its other
pages) and a new one-page frame.

Bundle manifest ``bundles/<name>.pages`` (for writers; readers never fetch it)::

    header   24 bytes   magic b"UFFDCMF1", u16 version (1), u16 flags (0), u32 page size,
                        u32 frame count, u32 page count
    frames   24 bytes   per frame, in bundle order (frame 0 at offset 0, the next where it ends):
                        u32 compressed length, u32 uncompressed length, blake2b-128 of the
                        uncompressed frame
    pages    16 bytes   per page, frame by frame, slot by slot: blake2b-128 of the page
    trailer  24 bytes   blake2b-128 of everything before it, magic b"UFFDMEND"

A writer reads every manifest whose bundle is listed (written after its bundle, so a manifest
always has one) and reuses a page it finds there by naming its frame and slot.

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

Integrity: the reader reads the index in one request and checks it against the trailer; every
frame it serves, fetched or from the cache, is decompressed and checked against its hash, so a
wrong bundle is a :class:`StoreError` naming the page read, never wrong bytes. Bundles never
change once written (their names are their hashes), so the reader pins only the index (as any
store does).

Threads: :meth:`ChunkedStore.read_into` may be called from many threads at once
(``parallel_reads``: 16 over a remote prefix): the in-memory frame cache is behind a lock, and
fetches and decompression run outside it.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import struct
import sys
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import zstandard

from ._base import PARALLEL_REQUESTS, Store, StoreError
from ._cache import ChunkCache
from ._chunks import MAX_CHUNK_SIZE, Codec, PackInfo, digest, is_zero, read_chunks
from ._objects import Objects, is_url, open_objects

__all__ = ["INDEX_MAGIC", "ChunkedStore", "write_chunked"]

INDEX_MAGIC = b"UFFDCIX1"
_END_MAGIC = b"UFFDCEND"
_MANIFEST_MAGIC = b"UFFDCMF1"
_MANIFEST_END = b"UFFDMEND"
_MANIFEST_SUFFIX = ".pages"
_HEADER_V1 = struct.Struct("<8sHHIQQI")
_ENTRY_V1 = struct.Struct("<I32s")
_HEADER = struct.Struct("<8sHHIQIIIII")
_TRAILER = struct.Struct("<16s8s")
_MANIFEST_HEADER = struct.Struct("<8sHHIII")
_MANIFEST_FRAME = struct.Struct("<II16s")
_NAME_SIZE = 32  # blake2b-256 names bundles (and version 1's chunk objects)
_HASH_SIZE = 16  # blake2b-128 identifies a page and checks a frame
_PREFIX = "bundles/"
_PAGE = 4096
_BUNDLE_SIZE = 4 << 20  # a bundle is uploaded once its frames pass this many bytes
_GAP = 16 << 10  # frames this close in one bundle are fetched in one GET (the gap too)
_MAX_RUN = 8 << 20  # but one GET brings at most about this many bytes
_ZERO_FRAME = 0  # the page table's frame delta for a zero page
# A frame that does not shrink grows by zstd's block headers: bound what a reader believes.
_MAX_FRAME = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + 1024

assert _HEADER_V1.size == 36 and _ENTRY_V1.size == 36 and _TRAILER.size == 24
assert _HEADER.size == 44 and _MANIFEST_HEADER.size == 24 and _MANIFEST_FRAME.size == 24
for _code, _width in (("I", 4), ("i", 4), ("Q", 8)):
    assert array(_code).itemsize == _width, f"array({_code!r}) is not {_width} bytes here"


def _split(dest: str) -> tuple[str, str]:
    """(directory or prefix, name) of a path or URL."""
    if is_url(dest):
        parent, _, name = dest.rpartition("/")
        return parent, name
    dest = os.path.abspath(dest.removeprefix("file://"))
    return os.path.dirname(dest), os.path.basename(dest)


def page_size_for(chunk_size: int) -> int:
    """The unit of deduplication for packs of ``chunk_size`` chunks: 4 KiB, or the whole chunk
    when the chunk size is not a multiple of it."""
    return _PAGE if chunk_size % _PAGE == 0 else chunk_size


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


# --- writing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Frame:
    """A frame in a bundle: ``bundle`` numbers the writer's list of bundle names."""

    bundle: int
    offset: int
    length: int
    raw: int
    hashed: bytes


def _manifest(page_size: int, frames: list[_Frame], pages: list[bytes]) -> bytes:
    out = bytearray(_MANIFEST_HEADER.pack(_MANIFEST_MAGIC, 1, 0, page_size, len(frames),
                                          len(pages)))  # fmt: skip
    for frame in frames:
        out += _MANIFEST_FRAME.pack(frame.length, frame.raw, frame.hashed)
    out += b"".join(pages)
    out += _TRAILER.pack(digest(out, 16), _MANIFEST_END)
    return bytes(out)


def _read_manifest(
    data: bytes, name: str, bundle: int, bundle_size: int, page_size: int
) -> list[tuple[bytes, _Frame, int]] | None:
    """(page hash, frame, slot) for every page in bundle ``name`` (numbered ``bundle``), or None
    when it was written for another page size. A manifest that does not check out is a
    StoreError: a page reused on its word would be served as another page's bytes."""
    what = f"bundle manifest {name}{_MANIFEST_SUFFIX}"
    if len(data) < _MANIFEST_HEADER.size + _TRAILER.size:
        raise StoreError(errno.EIO, f"{what}: corrupt: {len(data)} bytes")
    magic, version, flags, size, count, pages = _MANIFEST_HEADER.unpack_from(data)
    check, end = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if (magic, version, flags, end) != (_MANIFEST_MAGIC, 1, 0, _MANIFEST_END) or check != digest(
        data[: -_TRAILER.size], 16
    ):
        raise StoreError(errno.EIO, f"{what}: corrupt: it does not match its trailer's digest")
    if size != page_size:
        return None
    frames_at = _MANIFEST_HEADER.size
    pages_at = frames_at + count * _MANIFEST_FRAME.size
    if len(data) != pages_at + pages * _HASH_SIZE + _TRAILER.size:
        raise StoreError(
            errno.EIO, f"{what}: corrupt: {len(data)} bytes for {count} frames, {pages} pages"
        )
    found = []
    offset = 0
    hashes = (data[pages_at + k * _HASH_SIZE : pages_at + (k + 1) * _HASH_SIZE]
              for k in range(pages))  # fmt: skip
    for length, raw, hashed in _MANIFEST_FRAME.iter_unpack(data[frames_at:pages_at]):
        if not 0 < raw <= MAX_CHUNK_SIZE or not 0 < length <= _MAX_FRAME:
            raise StoreError(errno.EIO, f"{what}: corrupt: a frame of {length} bytes for {raw}")
        frame = _Frame(bundle, offset, length, raw, hashed)
        for slot in range(-(-raw // page_size)):
            page_hash = next(hashes, None)
            if page_hash is None:
                raise StoreError(
                    errno.EIO, f"{what}: corrupt: its frames hold more than {pages} pages"
                )
            found.append((page_hash, frame, slot))
        offset += length
    if len(found) != pages or offset != bundle_size:
        raise StoreError(
            errno.EIO,
            f"{what}: corrupt: {len(found)} pages in {offset} bytes of frames; it says {pages}"
            f" pages, and the bundle has {bundle_size} bytes",
        )
    return found


def _known_pages(
    bundles: Objects, page_size: int, names: list[str]
) -> dict[bytes, tuple[_Frame, int]]:
    """Page hash -> (frame, slot) of every page the manifests in ``bundles`` list; the bundles'
    names are appended to ``names`` (a frame's ``bundle`` numbers them)."""
    listed = bundles.sizes()  # one listing, rather than a question per page
    manifests = sorted(n for n in listed if n.endswith(_MANIFEST_SUFFIX)
                       and n.removesuffix(_MANIFEST_SUFFIX) in listed)  # fmt: skip
    known: dict[bytes, tuple[_Frame, int]] = {}
    with ThreadPoolExecutor(max_workers=bundles.parallel_reads) as pool:
        fetched = pool.map(bundles.get, manifests)
        for manifest, data in zip(manifests, fetched, strict=True):
            name = manifest.removesuffix(_MANIFEST_SUFFIX)
            found = _read_manifest(data, name, len(names), listed[name], page_size)
            if found is None:
                continue
            names.append(name)
            for page_hash, frame, slot in found:
                known.setdefault(page_hash, (frame, slot))
    return known


class _Bundles:
    """The bundle being filled, and the uploads of the ones already full."""

    def __init__(self, objects: Objects, names: list[str], page_size: int) -> None:
        self._objects = objects
        self._names = names
        self._page_size = page_size
        self._workers = objects.parallel_reads
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._pending: deque[Future[None]] = deque()
        self._start()
        #: Bytes of bundles and manifests written.
        self.written = 0

    def _start(self) -> None:
        self._data = bytearray()
        self._frames: list[_Frame] = []
        self._pages: list[bytes] = []
        self._number = len(self._names)
        self._names.append("")  # named when full: its name is its hash

    def add(self, frame: bytes, raw: bytes, page_hashes: list[bytes]) -> _Frame:
        made = _Frame(self._number, len(self._data), len(frame), len(raw), digest(raw, 16))
        self._data += frame
        self._frames.append(made)
        self._pages += page_hashes
        if len(self._data) >= _BUNDLE_SIZE:
            self.flush()
        return made

    def flush(self) -> None:
        """Upload the bundle being filled (if it has a frame), then its manifest."""
        if not self._frames:
            return
        data = bytes(self._data)
        name = digest(data, _NAME_SIZE).hex()
        manifest = _manifest(self._page_size, self._frames, self._pages)
        self._names[self._number] = name
        self.written += len(data) + len(manifest)

        def upload() -> None:
            self._objects.put(name, data)
            self._objects.put(name + _MANIFEST_SUFFIX, manifest)  # after: it vouches for it

        self._pending.append(self._pool.submit(upload))
        # parallel_reads uploads at a time, one request each; at most that many more wait.
        while len(self._pending) > 2 * self._workers or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # the first failure ends the pack
        self._start()

    def finish(self) -> None:
        self.flush()
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_chunked(
    store: Store,
    dest: str,
    *,
    chunk_size: int,
    level: int,
    progress: Callable[[int, int], None] | None,
    options: dict[str, Any],
) -> PackInfo:
    """The content-addressed pack of ``store`` with its index at ``dest`` (see :func:`pack`)."""
    import fsspec.utils  # here: reading a local pack must not import fsspec (an at-fork hook)

    if is_url(dest) and fsspec.utils.get_protocol(dest) in ("http", "https"):
        raise ValueError(f"{dest}: HTTP is read-only; write the pack locally or to S3")
    parent, name = _split(dest)
    if not name:
        raise ValueError(f"{dest!r} does not name an index (e.g. DIR/image.index)")
    page_size = page_size_for(chunk_size)
    objects = open_objects(f"{parent}/{_PREFIX}", options)
    here = open_objects(parent, options)
    names: list[str] = []
    try:
        known = _known_pages(objects, page_size, names)
        bundles = _Bundles(objects, names, page_size)
        try:
            compressor = Codec(b"", _HASH_SIZE).compressor(level)
            zeros = bytes(chunk_size)
            frames: dict[_Frame, int] = {}  # this index's frame numbers, in order of first use
            page_frame, page_slot, zero_pages = array("q"), array("I"), bytearray()
            zero_chunks = 0
            for chunk in read_chunks(store, chunk_size, progress):
                if is_zero(chunk, zeros):
                    count = -(-len(chunk) // page_size)
                    page_frame.extend(itertools.repeat(-1, count))
                    page_slot.extend(itertools.repeat(0, count))
                    zero_pages += b"\1" * count
                    zero_chunks += 1
                    continue
                new: list[memoryview] = []
                new_hashes: list[bytes] = []
                refs: list[tuple[_Frame, int] | int | None] = []  # None: zero; int: new slot
                group: dict[bytes, int] = {}
                for start in range(0, len(chunk), page_size):
                    page = chunk[start : start + page_size]
                    if is_zero(page, zeros):
                        refs.append(None)
                        continue
                    hashed = digest(page, _HASH_SIZE)
                    ref: tuple[_Frame, int] | int | None = known.get(hashed, group.get(hashed))
                    if ref is None:
                        ref = group[hashed] = len(new)
                        new.append(page)
                        new_hashes.append(hashed)
                    refs.append(ref)
                made: _Frame | None = None
                if new:
                    raw = b"".join(new)
                    made = bundles.add(compressor.compress(raw), raw, new_hashes)
                    for slot, hashed in enumerate(new_hashes):
                        known[hashed] = (made, slot)
                for ref in refs:
                    if ref is None:
                        page_frame.append(-1)
                        page_slot.append(0)
                        zero_pages.append(1)
                        continue
                    frame, slot = (made, ref) if isinstance(ref, int) else ref
                    assert frame is not None
                    page_frame.append(frames.setdefault(frame, len(frames)))
                    page_slot.append(slot)
                    zero_pages.append(0)
            bundles.finish()
        finally:
            bundles.close()
        index = _index(store.size, chunk_size, page_size, names, frames, page_frame, page_slot,
                       zero_pages)  # fmt: skip
        here.put(name, index)  # last: an index only ever names bundles that are there
    finally:
        objects.close()
        here.close()
    return PackInfo(
        path=dest,
        size=store.size,
        packed_size=sum(frame.length for frame in frames) + len(index),
        chunk_size=chunk_size,
        chunks=-(-store.size // chunk_size),
        level=level,
        zero_chunks=zero_chunks,
        unique_bytes=bundles.written + len(index),
        dictionary=0,
        layout="chunks",
    )


def _index(
    size: int,
    chunk_size: int,
    page_size: int,
    names: list[str],
    frames: dict[_Frame, int],
    page_frame: array[int],
    page_slot: array[int],
    zero_pages: bytearray,
) -> bytes:
    """A version 2 index (see the module docstring)."""
    bundles: dict[int, int] = {}  # writer's bundle number -> this index's
    for frame in frames:
        bundles.setdefault(frame.bundle, len(bundles))
    prefix = _PREFIX.encode()
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
    return out + _TRAILER.pack(digest(out, 16), _END_MAGIC)


# --- reading --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Index:
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
    check, end_magic = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if end_magic != _END_MAGIC or digest(data[: -_TRAILER.size], 16) != check:
        raise StoreError(errno.EIO, "corrupt pack index: it does not match its trailer's digest")


def _check_prefix(raw: bytes) -> str:
    try:
        prefix = raw.decode()
    except UnicodeDecodeError as err:
        raise StoreError(errno.EIO, f"corrupt pack index: bundle prefix: {err}") from err
    if prefix.startswith("/") or "://" in prefix or ".." in prefix.split("/"):
        raise StoreError(errno.EIO, f"pack index: prefix {prefix!r} leaves the index's directory")
    return prefix


def _parse(data: bytes) -> _Index:
    if len(data) < _HEADER_V1.size + _TRAILER.size:
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


def _parse_v2(data: bytes) -> _Index:
    if len(data) < _HEADER.size + _TRAILER.size:
        raise StoreError(errno.EIO, f"not a complete pack index: {len(data)} bytes")
    (_, _, _, chunk_size, size, page_size, bundles, frames, prefix_length,
     packed_length) = _HEADER.unpack_from(data)  # fmt: skip
    if len(data) != _HEADER.size + packed_length + _TRAILER.size:
        raise StoreError(
            errno.EIO,
            f"not a complete pack index: {len(data)} bytes, its header says "
            f"{_HEADER.size + packed_length + _TRAILER.size}",
        )
    _check_trailer(data)
    if not 0 < page_size <= MAX_CHUNK_SIZE or chunk_size == 0:
        raise StoreError(
            errno.EIO, f"corrupt pack index: pages of {page_size}, chunks of {chunk_size}"
        )
    pages = -(-size // page_size)
    lengths = [prefix_length, bundles * _NAME_SIZE, frames * 4, frames * 8, frames * 4,
               frames * 4, frames * _HASH_SIZE, pages, pages * 4, pages * 4]  # fmt: skip
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
    names = tuple(bytes(parts[1][k : k + _NAME_SIZE]).hex() for k in range(0, len(parts[1]),
                                                                          _NAME_SIZE))  # fmt: skip
    frame_object, frame_offset = _read_column("I", parts[2]), _read_column("Q", parts[3])
    frame_length, frame_raw = _read_column("I", parts[4]), _read_column("I", parts[5])
    hashes = bytes(parts[6])
    frame_hash = tuple(hashes[k : k + _HASH_SIZE] for k in range(0, len(hashes), _HASH_SIZE))
    zero = bytes(parts[7])
    page_frame = array("q", itertools.accumulate(_read_column("i", parts[8])))
    page_slot = _read_column("I", parts[9])
    if frames and (max(frame_object) >= bundles or max(frame_raw) > MAX_CHUNK_SIZE
                   or min(frame_raw) == 0 or min(frame_length) == 0
                   or max(frame_length) > _MAX_FRAME):  # fmt: skip
        raise StoreError(
            errno.EIO, "corrupt pack index: a frame outside its bundles, or of a bad size"
        )
    if zero.count(0) and (min(page_frame) < 0 or max(page_frame) >= frames):
        raise StoreError(
            errno.EIO, f"corrupt pack index: a page names a frame past the last ({frames})"
        )
    if zero.translate(None, b"\0\1"):
        raise StoreError(errno.EIO, "corrupt pack index: a zero-page flag other than 0 or 1")
    return _Index(2, size, chunk_size, page_size, prefix, names, frame_object, frame_offset,
                  frame_length, frame_raw, frame_hash, page_frame, page_slot, zero)  # fmt: skip


def _parse_v1(data: bytes) -> _Index:
    _, _, _, chunk_size, size, count, prefix_length = _HEADER_V1.unpack_from(data)
    entries_at = _HEADER_V1.size + prefix_length
    if len(data) != entries_at + count * _ENTRY_V1.size + _TRAILER.size:
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
    for i, (length, hashed) in enumerate(_ENTRY_V1.iter_unpack(data[entries_at : -_TRAILER.size])):
        n = min(chunk_size, size - i * chunk_size)
        if length == 0:
            if n not in zero_digests:
                zero_digests[n] = digest(bytes(n), _NAME_SIZE)
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
    return _Index(1, size, chunk_size, chunk_size, prefix, tuple(h.hex() for h in objects),
                  array("I", range(frames)), array("Q", bytes(8 * frames)), lengths, raws,
                  tuple(hashes), page_frame, array("I", bytes(4 * count)), bytes(zero))  # fmt: skip


class _Ranges:
    """Byte ranges of the immutable objects under one prefix: a local directory or any fsspec
    URL, read with the same deadlines, retries and error mapping as :class:`FsspecStore`. No
    version pinning: an object's name is its hash, and the reader checks what it got."""

    def __init__(self, prefix: str, options: dict[str, Any]) -> None:
        self.where = prefix.rstrip("/") + "/"
        self._options = options
        self._local = not is_url(prefix)
        self._fs: Any = None
        if self._local:
            if options:
                raise TypeError(f"options {sorted(options)} apply only to URLs")
            self._path = prefix.removeprefix("file://").rstrip("/")
            self.parallel_reads = 1
        else:
            from ._fsspec import connect, with_timeouts

            self._fs, path = connect(self.where, with_timeouts(prefix, 10.0, options))
            self._path = path.rstrip("/")
            self.parallel_reads = PARALLEL_REQUESTS

    def read(self, name: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of object ``name``, in one request; StoreError if fewer."""
        if self._local:
            path = os.path.join(self._path, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = os.pread(fd, stop - start, start)
                finally:
                    os.close(fd)
            except OSError as err:
                raise StoreError(err.errno or errno.EIO, f"{path}: {err.strerror}") from err
        else:
            if self._fs is None:
                raise StoreError(errno.EBADF, f"{self.where}: the store is closed")
            from ._fsspec import call_with_retries

            fs, path = self._fs, f"{self._path}/{name}"

            def fetch() -> bytes:
                got: bytes = fs.cat_file(path, start=start, end=stop)
                return got

            data = call_with_retries(self.where, f"{name} bytes {start}..{stop}", fetch, 3, 0.2)
        if len(data) != stop - start:
            raise StoreError(
                errno.EIO,
                f"{self.where}{name}: bytes {start}..{stop}: got {len(data)} bytes"
                " (the object is shorter than the index says)",
            )
        return bytes(data)

    def reopen(self) -> _Ranges:
        return _Ranges(self.where if not self._local else self._path, self._options)

    def close(self) -> None:
        self._fs = None


class ChunkedStore(Store):
    """The bytes of a content-addressed pack, read by its index (a path or a URL).

    ``storage_options`` are for both the index and the bundles (e.g. S3 keys). ``cache``: a
    :class:`ChunkCache` to look in before fetching a frame and to keep each fetched one in. The
    last ``cache_chunks`` decompressed frames are also kept in memory.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        cache: ChunkCache | None = None,
        cache_chunks: int = 8,
        **storage_options: Any,
    ) -> None:
        from ._open import open_raw

        location = os.fspath(index)
        raw = open_raw(location, storage_options)
        try:
            store = ChunkedStore.over(raw, location, storage_options, cache, cache_chunks)
        finally:
            raw.close()
        self._init(store._index, store._ranges, cache, cache_chunks)

    @classmethod
    def over(
        cls,
        raw: Store,
        location: str,
        options: dict[str, Any],
        cache: ChunkCache | None,
        cache_chunks: int = 8,
    ) -> ChunkedStore:
        """The pack whose index ``raw`` holds (read whole, then not needed); ``location`` is the
        index's path or URL, which the bundle prefix is relative to."""
        buffer = bytearray(raw.size)
        got = raw.read_into(0, memoryview(buffer))
        if got != len(buffer):
            raise StoreError(errno.EIO, f"{location}: not a complete pack index ({got} bytes)")
        index = _parse(bytes(buffer))
        parent, _ = _split(location)
        ranges = _Ranges(f"{parent}/{index.prefix}", options)
        store = cls.__new__(cls)
        store._init(index, ranges, cache, cache_chunks)
        return store

    def _init(
        self, index: _Index, ranges: _Ranges, cache: ChunkCache | None, cache_chunks: int
    ) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self._index = index
        self._ranges = ranges
        self._disk = cache
        self._codec = Codec(b"", _NAME_SIZE if index.version == 1 else _HASH_SIZE)
        self._cache_chunks = cache_chunks
        self._memory: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # guards the in-memory cache and the counters
        #: Requests made for frames (the cache's hits not counted) by this handle.
        self.fetches = 0
        #: Bytes those requests brought.
        self.fetched_bytes = 0

    @property
    def size(self) -> int:
        return self._index.size

    @property
    def chunk_size(self) -> int:
        return self._index.chunk_size

    @property
    def page_size(self) -> int:
        """The unit of deduplication (version 1: the chunk size)."""
        return self._index.page_size

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def zero_chunks(self) -> int:
        """Chunk-sized groups of the source that are all zero pages."""
        per = max(1, self.chunk_size // self.page_size)
        zero = self._index.zero
        return sum(1 for k in range(0, len(zero), per) if 0 not in zero[k : k + per])

    @property
    def parallel_reads(self) -> int:
        return self._ranges.parallel_reads

    def known_zero(self, offset: int, length: int) -> bool:
        end = offset + self.clamp(offset, length)
        if end == offset:
            return False
        step = self.page_size
        return 0 not in self._index.zero[offset // step : (end - 1) // step + 1]

    def read_range(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        index = self._index
        step = index.page_size
        pages = range(offset // step, -(-end // step))
        needed: dict[int, int] = {}  # frame -> the first page that needs it (for messages)
        for p in pages:
            if not index.zero[p]:
                needed.setdefault(index.page_frame[p], p)
        frames = self._frames(needed) if needed else {}
        for p in pages:
            lo, hi = max(offset, p * step), min(end, (p + 1) * step)
            if index.zero[p]:
                view[lo - offset : hi - offset] = bytes(hi - lo)
                continue
            f = index.page_frame[p]
            at = index.page_slot[p] * step - p * step  # page p's bytes start at p*step + at
            page_end = min(index.size, (p + 1) * step)
            if at + page_end > index.frame_raw[f]:
                raise StoreError(
                    errno.EIO,
                    f"{self._what(p)}: corrupt pack index: slot "
                    f"{index.page_slot[p]} lies outside frame {f}",
                )
            view[lo - offset : hi - offset] = memoryview(frames[f])[at + lo : at + hi]

    def _what(self, page: int) -> str:
        unit = "chunk" if self._index.version == 1 else "page"
        return f"pack {unit} {page} (bytes {page * self._index.page_size}..)"

    def _frames(self, needed: dict[int, int]) -> dict[int, bytes]:
        """The decoded frames ``needed`` (frame -> a page that needs it): from memory, the disk
        cache, or fetched, frames next to each other in one bundle in one request."""
        got: dict[int, bytes] = {}
        with self._lock:
            for f in needed:
                data = self._memory.get(f)
                if data is not None:
                    self._memory.move_to_end(f)
                    got[f] = data
        missing = [f for f in needed if f not in got]
        if self._disk is not None:
            for f in list(missing):
                frame = self._disk.get(self._index.frame_hash[f].hex())
                if frame is None:
                    continue
                try:
                    got[f] = self._decode(f, frame, needed[f], " from the cache")
                    missing.remove(f)
                except StoreError:
                    self._disk.discard(self._index.frame_hash[f].hex())  # a bad copy: fetch
        for run in self._runs(missing):
            self._fetch(run, needed, got)
        with self._lock:
            for f in needed:
                if f not in self._memory:
                    self._memory[f] = got[f]
                self._memory.move_to_end(f)
            while len(self._memory) > self._cache_chunks:
                self._memory.popitem(last=False)
        return got

    def _runs(self, frames: list[int]) -> list[list[int]]:
        """``frames`` as runs that one request each can fetch: same object, in order, apart by
        at most _GAP bytes, at most about _MAX_RUN bytes in all."""
        index = self._index
        ordered = sorted(frames, key=lambda f: (index.frame_object[f], index.frame_offset[f]))
        runs: list[list[int]] = []
        for f in ordered:
            if runs:
                last = runs[-1]
                first, prev = last[0], last[-1]
                prev_end = index.frame_offset[prev] + index.frame_length[prev]
                at = index.frame_offset[f]
                if (index.frame_object[f] == index.frame_object[prev]
                        and prev_end <= at <= prev_end + _GAP
                        and at - index.frame_offset[first] < _MAX_RUN):  # fmt: skip
                    last.append(f)
                    continue
            runs.append([f])
        return runs

    def _fetch(self, run: list[int], needed: dict[int, int], got: dict[int, bytes]) -> None:
        index = self._index
        name = index.names[index.frame_object[run[0]]]
        start = index.frame_offset[run[0]]
        stop = index.frame_offset[run[-1]] + index.frame_length[run[-1]]
        try:
            data = self._ranges.read(name, start, stop)
        except StoreError as err:
            raise StoreError(
                err.errno or errno.EIO, f"{self._what(needed[run[0]])}: {err.strerror}"
            ) from err
        with self._lock:
            self.fetches += 1
            self.fetched_bytes += len(data)
        for f in run:
            at = index.frame_offset[f] - start
            frame = data[at : at + index.frame_length[f]]
            got[f] = self._decode(f, frame, needed[f], "")
            if self._disk is not None:
                self._disk.put(index.frame_hash[f].hex(), frame)

    def _decode(self, f: int, frame: bytes, page: int, where: str) -> bytes:
        index = self._index
        what = self._what(page)
        if index.version == 1:
            expected = index.frame_length[f]
            if len(frame) != expected:
                raise StoreError(
                    errno.EIO,
                    f"{what}{where}: corrupt: object {index.names[f]} has "
                    f"{len(frame)} bytes, the index says {expected}",
                )
        else:
            name = index.names[index.frame_object[f]]
            start = index.frame_offset[f]
            what += f": frame {f} ({self._ranges.where}{name} bytes {start}..)"
        return self._codec.decode(frame, index.frame_raw[f], index.frame_hash[f], what + where)

    def __enter__(self) -> Self:
        return self

    def reopen(self) -> ChunkedStore:
        """The same index (parsed once), with the bundle prefix and the cache opened anew for
        this process. The index's bytes were read whole at open, so no source is pinned."""
        store = ChunkedStore.__new__(ChunkedStore)
        cache = self._disk.reopen() if self._disk is not None else None
        store._init(self._index, self._ranges.reopen(), cache, self._cache_chunks)
        return store

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
        self._ranges.close()

    def __repr__(self) -> str:
        return (f"<ChunkedStore {self.size} bytes, {self._index.pages} pages in "
                f"{len(self._index.frame_raw)} frames in {self._ranges.where!r}>")  # fmt: skip

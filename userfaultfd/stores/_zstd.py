"""A seekable zstd pack: independently compressed chunks with an index, read through any Store.

Format (version 1, all integers little-endian)::

    header   32 bytes   magic b"UFFDZST1", u16 version (1), u16 flags (0), u32 chunk size,
                        u64 uncompressed size, u64 chunk count
    chunks              chunk i is one zstd frame holding bytes [i * chunk size, (i + 1) * chunk
                        size) of the source (the last one may be shorter); frames follow each
                        other from offset 32 with no gaps
    index    28 bytes   per chunk: u64 offset of its frame, u32 frame length, blake2b-128 of the
                        uncompressed chunk
    footer   40 bytes   u64 offset of the index, u64 chunk count, blake2b-128 of header + index,
                        magic b"UFFDZEND"

A reader reads the header, the footer and the index (three reads, whatever the transport) and
checks them against each other and the footer's digest; a truncated or foreign file fails there.
Every chunk it then serves is decompressed and checked against its hash, so a corrupted pack
raises :class:`StoreError` naming the chunk: a page fault handler poisons that page rather than
mapping wrong bytes. Chunks are independent so a random page costs one chunk, and the index sits at
the end so :func:`pack` can stream the source without knowing compressed sizes up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO, Self

import zstandard

from ._base import Store, StoreError
from ._simple import FileStore

__all__ = ["MAGIC", "PackInfo", "ZstdStore", "pack"]

MAGIC = b"UFFDZST1"
_END_MAGIC = b"UFFDZEND"
_VERSION = 1
_HEADER = struct.Struct("<8sHHIQQ")
_ENTRY = struct.Struct("<QI16s")
_FOOTER = struct.Struct("<QQ16s8s")
_DIGEST_SIZE = 16
_MAX_CHUNK_SIZE = 1 << 30  # a frame length must fit the index's u32 even if incompressible
_READ_SPAN = 8 << 20  # pack() reads the source this many bytes at a time at most

assert _HEADER.size == 32 and _ENTRY.size == 28 and _FOOTER.size == 40


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class PackInfo:
    """What :func:`pack` wrote."""

    #: Path of the pack.
    path: str
    #: Uncompressed size in bytes.
    size: int
    #: Size of the pack file in bytes (header, frames, index and footer).
    packed_size: int
    chunk_size: int
    chunks: int
    level: int

    @property
    def ratio(self) -> float:
        """Uncompressed size over packed size (above 1 means it shrank)."""
        return self.size / self.packed_size if self.packed_size else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """A pack's parsed header and index; shared by a store and its reopened copies."""

    size: int
    chunk_size: int
    offsets: tuple[int, ...]  # chunk count + 1 entries: frame i is offsets[i]:offsets[i + 1]
    digests: tuple[bytes, ...]


def pack(
    source: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    chunk_size: int = 1 << 20,
    level: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> PackInfo:
    """Compress ``source`` (a path or a Store) into a pack at ``dest``; see the module docstring.

    ``progress(bytes_done, bytes_total)`` is called after every chunk. ``dest`` is written under
    a temporary name and renamed at the end, so a failed pack leaves no half-written file.
    """
    if not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is out of range: 1 .. {_MAX_CHUNK_SIZE}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(
            f"compression level {level} is out of range: 1 .. {zstandard.MAX_COMPRESSION_LEVEL}"
        )
    dest = os.fspath(dest)
    store = source if isinstance(source, Store) else FileStore(source)
    tmp = os.path.join(os.path.dirname(dest) or ".", f".{os.path.basename(dest)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            _write_pack(store, out, chunk_size, level, progress)
            packed_size = out.tell()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if store is not source:
            store.close()
    size = store.size
    return PackInfo(
        path=dest,
        size=size,
        packed_size=packed_size,
        chunk_size=chunk_size,
        chunks=-(-size // chunk_size),
        level=level,
    )


def _write_pack(
    store: Store,
    out: BinaryIO,
    chunk_size: int,
    level: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    size = store.size
    count = -(-size // chunk_size)
    header = _HEADER.pack(MAGIC, _VERSION, 0, chunk_size, size, count)
    out.write(header)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=False)
    index = bytearray()
    position = _HEADER.size
    # Every span but the last is a whole number of chunks, so chunks never straddle two reads.
    span = bytearray(min(size, max(1, _READ_SPAN // chunk_size) * chunk_size))
    done = 0
    if progress is not None:
        progress(0, size)
    while done < size:
        # Read many small chunks at once: a Store read may be a network round trip.
        want = min(len(span), size - done)
        view = memoryview(span)[:want]
        got = store.read_into(done, view)
        if got != want:
            raise StoreError(f"source ended at {done + got} bytes, its size said {size}")
        for start in range(0, want, chunk_size):
            chunk = view[start : start + chunk_size]
            frame = compressor.compress(chunk)
            out.write(frame)
            index += _ENTRY.pack(position, len(frame), _digest(chunk))
            position += len(frame)
            done += len(chunk)
            if progress is not None:
                progress(done, size)
    out.write(index)
    out.write(_FOOTER.pack(position, count, _digest(header + index), _END_MAGIC))


class ZstdStore(Store):
    """The uncompressed bytes of a pack made by :func:`pack`, read through ``raw``.

    ``raw`` can be any Store (a file, HTTP, S3), and this store owns it: closing this closes that.
    The last ``cache_chunks`` decompressed chunks are kept, so a reader walking a chunk page by page
    decompresses it once.
    """

    def __init__(self, raw: Store, *, cache_chunks: int = 8) -> None:
        self._init(raw, _read_layout(raw), cache_chunks)

    def _init(self, raw: Store, layout: _Layout, cache_chunks: int) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self._raw = raw
        self._layout = layout
        self._cache_chunks = cache_chunks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # guards the cache only; reads run in parallel

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def chunk_size(self) -> int:
        return self._layout.chunk_size

    @property
    def chunks(self) -> int:
        return len(self._layout.digests)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        end = offset + self.clamp(offset, len(buffer))
        if end == offset:
            return 0
        step = self.chunk_size
        first, last = offset // step, (end - 1) // step
        chunks = self._chunks(first, last)
        for i, chunk in zip(range(first, last + 1), chunks, strict=True):
            lo = max(offset, i * step)
            hi = min(end, (i + 1) * step)
            buffer[lo - offset : hi - offset] = chunk[lo - i * step : hi - i * step]
        return end - offset

    def _chunks(self, first: int, last: int) -> list[bytes]:
        """Decompressed chunks first..last, from the cache or from one read of ``raw``."""
        with self._lock:
            found = {i: self._cache[i] for i in range(first, last + 1) if i in self._cache}
            for i in found:
                self._cache.move_to_end(i)
        missing = [i for i in range(first, last + 1) if i not in found]
        if missing:
            # Frames are contiguous: one raw read covers every missing one (one request on HTTP).
            lo, hi = missing[0], missing[-1]
            offsets = self._layout.offsets
            frames = bytearray(offsets[hi + 1] - offsets[lo])
            got = self._read_raw(offsets[lo], memoryview(frames), lo, hi)
            for i in missing:
                start = offsets[i] - offsets[lo]
                stop = offsets[i + 1] - offsets[lo]
                if stop > got:
                    raise StoreError(f"pack chunk {i}: truncated (the pack ends inside it)")
                found[i] = self._decode(i, memoryview(frames)[start:stop])
            with self._lock:
                for i in missing:
                    self._cache[i] = found[i]
                    self._cache.move_to_end(i)
                while len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        return [found[i] for i in range(first, last + 1)]

    def _read_raw(self, offset: int, view: memoryview, lo: int, hi: int) -> int:
        try:
            return self._raw.read_into(offset, view)
        except StoreError as err:
            which = f"chunk {lo}" if lo == hi else f"chunks {lo}..{hi}"
            raise StoreError(f"pack {which}: {err.strerror}", code=err.errno or 5) from err

    def _decode(self, i: int, frame: memoryview) -> bytes:
        step = self.chunk_size
        length = min(step, self.size - i * step)
        try:
            # max_output_size bounds a frame that does not declare its size; one that does is
            # decompressed into a buffer of the declared size, so a corrupt header declaring
            # terabytes would raise MemoryError: check the declaration first.
            declared = zstandard.frame_content_size(frame)
            if declared not in (length, -1):
                raise StoreError(
                    f"pack chunk {i} (bytes {i * step}..): corrupt: its frame declares "
                    f"{declared} bytes, the chunk has {length}"
                )
            data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=length)
        except zstandard.ZstdError as err:
            raise StoreError(f"pack chunk {i} (bytes {i * step}..): corrupt: {err}") from err
        if len(data) != length or _digest(data) != self._layout.digests[i]:
            raise StoreError(f"pack chunk {i} (bytes {i * step}..): corrupt: hash mismatch")
        return data

    def __enter__(self) -> Self:
        return self

    def reopen(self) -> ZstdStore:
        # The layout is immutable and shared; only the transport needs a fresh handle, and the
        # raw store's reopen() pins it to the bytes this store opened (or raises StoreError).
        # Should those bytes change anyway, every chunk is checked against its hash.
        store = ZstdStore.__new__(ZstdStore)
        store._init(self._raw.reopen(), self._layout, self._cache_chunks)
        return store

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self._raw.close()

    def __repr__(self) -> str:
        return f"<ZstdStore {self.size} bytes, {self.chunks} chunks over {self._raw!r}>"


def _read_exact(raw: Store, offset: int, length: int, what: str) -> bytes:
    buf = bytearray(length)
    got = raw.read_into(offset, memoryview(buf))
    if got != length:
        raise StoreError(f"not a complete pack: {what} is cut short ({got} of {length} bytes)")
    return bytes(buf)


def _read_layout(raw: Store) -> _Layout:
    """Parse and cross-check the header, footer and index; see the module docstring."""
    total = raw.size
    if total < _HEADER.size + _FOOTER.size:
        if total >= len(MAGIC) and _read_exact(raw, 0, len(MAGIC), "magic") != MAGIC:
            raise StoreError(f"not a uffd zstd pack: no {MAGIC!r} magic at the start")
        raise StoreError(f"not a complete pack: {total} bytes is shorter than header + footer")
    header = _read_exact(raw, 0, _HEADER.size, "header")
    magic, version, _flags, chunk_size, size, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise StoreError(f"not a uffd zstd pack: magic {magic!r}, expected {MAGIC!r}")
    if version != _VERSION:
        raise StoreError(f"pack format version {version} is not supported (only {_VERSION})")
    if chunk_size == 0 or count != -(-size // chunk_size):
        raise StoreError(f"corrupt pack header: {count} chunks of {chunk_size} for {size} bytes")
    footer = _read_exact(raw, total - _FOOTER.size, _FOOTER.size, "footer")
    index_offset, footer_count, digest, end_magic = _FOOTER.unpack(footer)
    index_size = count * _ENTRY.size
    if end_magic != _END_MAGIC or footer_count != count:
        raise StoreError(f"not a complete pack: no valid footer at the end ({total} bytes)")
    if index_offset + index_size + _FOOTER.size != total:
        raise StoreError(f"not a complete pack: index at {index_offset} does not fit {total} bytes")
    index = _read_exact(raw, index_offset, index_size, "index")
    if _digest(header + index) != digest:
        raise StoreError("corrupt pack: header or index does not match the footer's digest")
    offsets = [_HEADER.size]
    digests = []
    for i, (offset, length, chunk_digest) in enumerate(_ENTRY.iter_unpack(index)):
        if offset != offsets[-1]:
            raise StoreError(f"corrupt pack index: chunk {i} at {offset}, expected {offsets[-1]}")
        offsets.append(offset + length)
        digests.append(chunk_digest)
    if offsets[-1] != index_offset:
        raise StoreError(
            f"corrupt pack index: frames end at {offsets[-1]}, index at {index_offset}"
        )
    return _Layout(size, chunk_size, tuple(offsets), tuple(digests))
